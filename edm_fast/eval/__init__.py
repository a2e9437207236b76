"""Evaluation and experiments, kept apart from the library: nothing below ``eval`` imports it.

    compare.py            EDM against DDPM at equal NFE: the run, the real-data floor, reports
    samplers_at_nfe.py    the comparison's five samplers by name, at a given NFE
    scorers.py            the comparison's scores: feature FD + accuracy, toy-mixture scores
    comparison_rows.py    the comparison's results (RunSpec, Row) and their Markdown table
    comparison_plots.py   the comparison's figures: quality against NFE, sample sheets
    trajectories.py       pictures of sampling trajectories
    metrics.py            the digits classifier and Frechet distance on its features
    fid.py                FID and FD_DINOv2 from reference statistics
    feature_nets.py       Inception-v3 and DINOv2 feature networks from local weights
    metric_images.py      reading sample folders for the metrics
    benchmark.py          the latency-per-NFE harness of ``edm-fast bench``

May import anything but ``serve`` and ``cli``.
"""
