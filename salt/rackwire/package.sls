{%- from 'rackwire/map.jinja' import rackwire with context %}
# rackwire.package: the rackwire package, from a local file or a repository.
{%- if rackwire.pkg.source %}
rackwire-package:
  pkg.installed:
    - sources:
      - {{ rackwire.pkg.name }}: {{ rackwire.pkg.source }}
{%- else %}
{%- if rackwire.pkg.repo %}
rackwire-repo:
  pkgrepo.managed:
  {%- for k, v in rackwire.pkg.repo|dictsort %}
    - {{ k }}: {{ v|json }}
  {%- endfor %}
    - require_in:
      - pkg: rackwire-package
{%- endif %}
rackwire-package:
  pkg.installed:
    - name: {{ rackwire.pkg.name }}
  {%- if rackwire.pkg.version %}
    - version: {{ rackwire.pkg.version|json }}
  {%- endif %}
    - refresh: {{ rackwire.pkg.repo|length > 0 }}
{%- endif %}
