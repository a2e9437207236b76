"""Files in and out: everything that reads or writes a model, a program or a sample.

    checkpoints.py       edm-fast .safetensors checkpoints (weights + config), atomic writes
    official.py          NVlabs EDM/EDM2 snapshots (.pkl/.pt) -> config, Denoiser, checkpoint
    official_edm2.py     the config of an NVlabs EDM2 snapshot (Precond + encoder records)
    official_pickle.py   the restricted unpickler: .pkl/.pt/.pth files read without running code
    official_records.py  what it builds (inert module/tensor/numpy records) and its cost bounds
    models.py            a model name or path -> a ready denoiser and its model card
    model_card.py        the model card: what a model's file says, kept beside the module
    export.py            AOTInductor (.pt2) and TorchScript exports with their metadata
    onnx_export.py       ONNX export; onnx_check.py checks an ONNX file's external data
    openvino_export.py   OpenVINO IR export
    exported.py          an exported .pt2/.ts file loaded back as a denoiser
    trusted_exports.py   the record of exports this user wrote (loading one runs it)
    program_file.py      a sampling program as a text file (the standalone binary's --plan)
    samples.py           writing samples: grids, per-seed PNGs, .npz, plots
    latents.py           EDM2 img512 latents decoded to images with a user's diffusers VAE
    files.py             the one atomic file writer

May import: the core (top-level modules of ``edm_fast``) and ``nets``. Never imports
``sampling``, ``train``, ``eval``, ``serve`` or ``cli``.
"""
