from megatron_hybridnorm.check.cli import entry

entry()
