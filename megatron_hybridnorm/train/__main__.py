from megatron_hybridnorm.train.cli import entry

entry()
