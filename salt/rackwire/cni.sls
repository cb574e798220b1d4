{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.cni: one CNI network config per pillar rackwire:cni:networks entry,
# in rackwire:cni:conf_dir (/etc/cni/net.d), for the runtimes that use CNI:
# podman (CNI backend), nerdctl/containerd, Nomad (network mode
# "cni/<name>"). Each is a conflist of the rackwire-cni plugin alone; see
# docs/containers.md for the keys.
include:
  - rackwire.package
{%- for name, net in rackwire.cni.networks|dictsort %}
{%- set plugin = {'type': 'rackwire-cni', 'socket': net.get('socket', rackwire.cni.socket), 'labels': net.get('labels', {})} %}
{%- set conflist = {'cniVersion': net.get('cniVersion', '1.1.0'), 'name': name, 'plugins': [plugin]} %}

rackwire-cni-{{ name }}:
  file.managed:
    - name: {{ rackwire.cni.conf_dir }}/{{ net.get('priority', 50) }}-{{ name }}.conflist
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - contents: {{ conflist|json|json }}
    - require:
      - pkg: rackwire-package
{%- endfor %}
