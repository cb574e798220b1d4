{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.bird: BIRD 2 installed, enabled and running. rackwired writes its
# config (bgp.bird_config) and reconfigures it through the control socket, so
# Salt only keeps the daemon up.
{%- if rackwire.bird.manage %}
rackwire-bird-package:
  pkg.installed:
    - name: {{ rackwire.bird.pkg }}

rackwire-bird-service:
  service.running:
    - name: {{ rackwire.bird.service }}
    - enable: True
    - require:
      - pkg: rackwire-bird-package
{%- endif %}
