"""The vision side of Nemotron-Labs-Diffusion-VLM, beside the text model (never inside its forward).

- `config`: the VLM configuration (the text `NLDConfig` as it is, the Pixtral tower, the projector) and the
  checkpoint's tensor names in both spellings;
- `processor`: images -> normalised pixels exactly as the reference prepares them, with decoding guards;
- `tower`: the Pixtral tower + Mistral 3 projector in plain PyTorch (pixels -> one text-width row per cell);
- `encoder`: the runtime side: encodes admitted requests' images once, cached by content digest.

Kept import-light: `nld_trt.checkpoint` reads `config` from here.
"""
