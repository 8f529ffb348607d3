"""One module per CLI verb: ``register(subparsers, verb, help) -> parser`` and ``run(args) -> int``.

The CLI imports every verb module to build its parser, and the runtime-only
install on a device has no torch: so a verb imports the build side (models,
checkpoints, training, ``sfedge.build``) inside ``run``, and everything else
at the top.
"""
