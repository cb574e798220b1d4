# rackwire: the whole formula: package, config, policies, CNI networks, BIRD,
# the agent.
include:
  - rackwire.package
  - rackwire.config
  - rackwire.policies
  - rackwire.cni
  - rackwire.bird
  - rackwire.service
