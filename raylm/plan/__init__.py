"""The planner: predicted memory and speed of every layout of a config, and the decisions taken from them.

It sits above config, model and parallel's plain settings (raylm.parallel.ds_config) and below train:
`raylm plan` prints its table, `raylm train` asks it for `parallel.layout=auto`, its preflight and
`checkpoint.every_steps=auto`. It never imports DeepSpeed.
"""
