{#- rackwire.orch.rollout: gray release of the rackwire formula.
    Run on the master:  salt-run state.orchestrate rackwire.orch.rollout
    (pillar rackwire:rollout, see docs/salt.md). One canary host first,
    then batches of batch_percent of the remaining hosts, one after the
    other. Every step requires the one before it, so the first failure (a
    state that fails, or check_cmd exiting non-zero on any host of the
    batch) stops the rollout: later batches are not run. -#}
{%- from 'rackwire/map.jinja' import rackwire with context %}
{%- set ro = rackwire.rollout %}
{%- if ro.minions %}
{%-   set hosts = ro.minions|list %}
{%- else %}
{%-   set hosts = salt['saltutil.runner']('manage.up', tgt=ro.target, tgt_type=ro.tgt_type)|sort %}
{%- endif %}
{%- set canary = ro.canary or (hosts[0] if hosts else '') %}
{%- set rest = hosts|reject('equalto', canary)|list %}
{%- set pct = ro.batch_percent|int %}
{%- set size = [((rest|length) * pct + 99) // 100, 1]|max %}
{%- if not canary %}
rackwire-rollout-no-hosts:
  test.fail_without_changes:
    - name: no host matches {{ ro.target }} ({{ ro.tgt_type }})
{%- else %}
rackwire-rollout-canary:
  salt.state:
    - tgt: {{ canary|json }}
    - sls: rackwire
    - failhard: True

rackwire-rollout-canary-check:
  salt.function:
    - name: cmd.run
    - tgt: {{ canary|json }}
    - arg:
      - {{ ro.check_cmd|json }}
    - require:
      - salt: rackwire-rollout-canary
{%-   set ns = namespace(prev='rackwire-rollout-canary-check') %}
{%-   for batch in rest|batch(size) %}
{%-     set n = loop.index %}

rackwire-rollout-batch-{{ n }}:
  salt.state:
    - tgt: {{ batch|json }}
    - tgt_type: list
    - sls: rackwire
    - failhard: True
    - require:
      - salt: {{ ns.prev }}

rackwire-rollout-batch-{{ n }}-check:
  salt.function:
    - name: cmd.run
    - tgt: {{ batch|json }}
    - tgt_type: list
    - arg:
      - {{ ro.check_cmd|json }}
    - require:
      - salt: rackwire-rollout-batch-{{ n }}
{%-     set ns.prev = 'rackwire-rollout-batch-' ~ n ~ '-check' %}
{%-   endfor %}
{%- endif %}
