"""qemu-facing code: argv templates, option escaping, host fingerprint (and, with the runner,
the QMP facade and the guest-agent client). Imports only ``corral.spec`` and ``corral.errors``.
"""
