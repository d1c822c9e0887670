# Stand-in for the published common/config.py, which reads a job YAML and
# sets up logging at import. The model modules import `config` but read
# nothing from it (checked: no `cfg.` use under model/), so nothing is needed.
config = None
