"""Evaluation and experiments, kept apart from the library: nothing below ``eval`` imports it.

    compare.py        EDM against DDPM at equal NFE: samplers, scores, reports
    trajectories.py   pictures of sampling trajectories
    metrics.py        the digits classifier and Frechet distance on its features
    fid.py            FID and FD_DINOv2 from reference statistics
    feature_nets.py   Inception-v3 and DINOv2 feature networks from local weights
    metric_images.py  reading sample folders for the metrics
    benchmark.py      the latency-per-NFE harness of ``edm-fast bench``

May import anything but ``serve`` and ``cli``.
"""
