{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.service: rackwired enabled and running. A change of the config or
# of a policy reloads it (SIGHUP: the agent applies the difference and keeps
# forwarding), it never restarts it. BIRD is not a requisite on purpose: the
# agent runs (and forwards) without it and re-applies bird.conf once BIRD is
# back, so a BIRD failure fails only its own state.
include:
  - rackwire.config
  - rackwire.policies
  - rackwire.bird

{%- if rackwire.service.start_now %}
# An explicit start skips the restart gate's jitter: the gate consumes this
# flag file. Only written when the agent is not running.
rackwire-start-now:
  file.managed:
    - name: {{ rackwire.state_dir }}/start-now
    - contents: ''
    - makedirs: True
    - unless: systemctl is-active --quiet {{ rackwire.service.name }}
    - require_in:
      - service: rackwire-service
{%- endif %}

{%- if rackwire.config.get('bgp', {}).get('enabled') %}
# With BGP the agent writes BIRD's config: the package's drop-in grants the
# unit that (CAP_DAC_OVERRIDE, /etc/bird writable; docs/packaging.md). It is
# linked before the first start; enabling BGP on a running host needs a
# restart for the capability to apply (a reload keeps the process).
rackwire-bgp-dropin:
  file.symlink:
    - name: /etc/systemd/system/{{ rackwire.service.name }}.d/bgp.conf
    - target: /usr/share/rackwire/systemd/rackwired-bgp.conf
    - makedirs: True
    - require:
      - pkg: rackwire-package
    # The service state reloads systemd when a unit's files changed.
    - require_in:
      - service: rackwire-service
{%- endif %}

rackwire-service:
  service.running:
    - name: {{ rackwire.service.name }}
    - enable: True
    - reload: True
    - require:
      - pkg: rackwire-package
      - file: rackwire-config
    - watch:
      - file: rackwire-config
      - file: rackwire-policy-dir
{%- for name in rackwire.policies|sort %}
      - file: rackwire-policy-{{ name }}
{%- endfor %}
