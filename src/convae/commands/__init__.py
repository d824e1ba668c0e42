"""One module per ``convae`` command, named as the command; each gives ``main(...)``: the command's own policy
(resume rules, the sweep's batch size, encode's defaults) over the library. ``cli.py`` parses and dispatches;
nothing here parses arguments or prints errors. ``run`` serves ``run``, ``pretrain`` and ``finetune``."""
