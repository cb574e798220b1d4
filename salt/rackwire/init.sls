# rackwire: the whole formula: package, config, policies, BIRD, the agent.
include:
  - rackwire.package
  - rackwire.config
  - rackwire.policies
  - rackwire.bird
  - rackwire.service
