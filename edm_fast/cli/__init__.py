"""The ``edm-fast`` command: one module per command, ``main.py`` assembles the parser.

    main.py              the parser, the entry point ``main`` and its error handling: any
                         ``edm_fast.errors.EdmFastError`` (and OSError, ValueError) is printed
                         as one line, ``edm-fast CMD: error: ...``
    sampling_options.py  the options every sampling command shares, generated from
                         ``edm_fast.plan.SamplingOptions`` (solver, steps, ...), and the
                         execution options (backend, device, dtype, batch)
    sample.py  train.py  plan.py  bench.py  export.py  convert.py  compare.py  serve.py
    phema.py  metrics.py one command each: ``add_<command>_command(sub, formatter)`` registers
                         it; train's options are generated from ``TrainConfig`` (train.py)

May import anything. The library never imports ``cli``.
"""
