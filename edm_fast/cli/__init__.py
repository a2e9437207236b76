"""The ``edm-fast`` command: one module per command, ``main.py`` builds the parser.

    main.py              the parser, the entry point ``main``, and ``sample``
    sampling_options.py  the options every sampling command shares (solver, steps, backend, ...)
    commands.py          ``bench``, ``plan``, ``train``, ``convert`` and the other small commands
    compare.py  convert.py  export.py  metrics.py  phema.py  serve.py   one command each

May import anything. The library never imports ``cli``.
"""

