"""The VM commands, one module per group of verbs (like hatch's ``cli/<noun>/<verb>.py``):
``show`` (list, show, ip), ``lifecycle`` (start, stop, restart, reset, kill, wait),
``aetherscale`` (its command names); documents, media and the guest in
:mod:`corral.cli.vms`; :data:`corral.cli.main.COMMANDS` finds each by name."""
