{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.config: /etc/rackwire/rackwire.toml from pillar rackwire:config.
# check_cmd runs `rackwired check-config --config TMPFILE` on the rendered
# file before it replaces the old one: a bad pillar fails this state and the
# agent keeps the old file.
include:
  - rackwire.package

rackwire-config:
  file.managed:
    - name: {{ rackwire.config_file }}
    - source: salt://rackwire/files/rackwire.toml.jinja
    - template: jinja
    - context:
        config: {{ rackwire.config|json }}
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - tmp_ext: .toml
    - check_cmd: {{ rackwire.daemon }} check-config --config
    - require:
      - pkg: rackwire-package
