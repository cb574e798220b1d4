{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.policies: one file per pillar rackwire:policies entry in
# /etc/rackwire/policies.d/<name>.yaml (CiliumNetworkPolicy vocabulary).
include:
  - rackwire.package

rackwire-policy-dir:
  file.directory:
    - name: {{ rackwire.policy_dir }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
{%- if rackwire.policies_clean %}
    - clean: True
{%- endif %}
    - require:
      - pkg: rackwire-package

{%- for name, doc in rackwire.policies|dictsort %}
rackwire-policy-{{ name }}:
  file.managed:
    - name: {{ rackwire.policy_dir }}/{{ name }}.yaml
    - user: root
    - group: root
    - mode: '0644'
  {%- if doc is string %}
    - contents: {{ doc|json }}
  {%- else %}
    - contents: {{ doc|yaml(False)|json }}
  {%- endif %}
    - require_in:
      - file: rackwire-policy-dir
{%- endfor %}
