"""NLD's joint training objective in one forward pass: a clean copy (causal, AR loss) and a noisy copy
(block diffusion, masked-token loss) of every sequence, concatenated along time.

A sequence is a rendered conversation (`nld_trt.training.data.render`): its token ids and the spans that
carry the loss, one per trained assistant turn (the answer and its EOS). A single question is the case of
one span at the end. A vision-language conversation also carries its images: each image's pixels and the
positions of its `<|image_pad|>` tokens, whose embeddings the vision encoder's rows replace (in both copies,
wherever such a position appears), as serving's prefill does; the encoder trains with the model. Where an
image has per-cell labels (what covers each cell: colour and kind of object), an auxiliary linear probe
(training only, never saved) must read them from its rows: a dense signal that keeps the rows of a tower
trained from scratch informative (without it they collapsed to one constant vector before the model learned
to read them, in short runs that also had the ln_pre bug the README's tiny VLM section describes). Where an
answer states a fact read off one object (`Example.looks`), an optional look loss (`look_loss`) trains one
backbone layer to attend, from the slots that predict that token, to the object's cells.

Row layout: `[clean copy | noisy copy]`, each right-padded to the batch's longest. The clean copy is the
whole sequence. The noisy copy holds, for every span, the blocks that cover it (the last one filled up with
EOS after the span's end), at the same absolute positions as the clean copy; in each block some tokens (never
the block's first, which decoding always knows) are replaced by the mask token. Who sees whom:
- a clean token sees the clean tokens at or before its position (causal);
- a noisy token sees every noisy token of its own block (bidirectional) and the clean tokens before its
  block: exactly what a block pass sees at inference, with the committed KV cache (the conversation so
  far) as the clean prefix;
- a padding slot sees only itself (so attention never has an empty row).
Alignment is llada: noisy logits at position j predict the token at j; clean logits at j predict j + 1.

Block boundaries take a random phase per span (half the time aligned with the answer's start, as in
`dlm`; otherwise anywhere, as in `linear_spec`, whose drafts start wherever the accepted text ends), and
often every token after the block's first is masked: that is the `linear_spec` draft `[t, MASK x (B-1)]`.
Blocks are told apart by their start position, so a span's first block always starts after the previous
span's last block started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import LoRA, NLDModel, apply_rope

IGNORE = -100
PAD, CLEAN, NOISY = 0, 1, 2


@dataclass(frozen=True)
class MaskSchedule:
    """How the noisy copy is corrupted, per block: with probability `p_full` every maskable token
    (the `linear_spec` draft case), otherwise each with probability r ~ U(r_min, 1)."""

    p_full: float = 0.3
    r_min: float = 0.05
    p_aligned: float = 0.5  # block phase aligned with the solution's first token


@dataclass
class ExampleImage:
    pads: list[int]  # positions of its pads, in the order of the encoder's rows (raster order of its cells)
    pixels: torch.Tensor  # [3, H, W], normalised
    cells: torch.Tensor | None = None  # [cells, labels] per cell (its colour class, kind class, ...), for the auxiliary probe


@dataclass
class Example:
    tokens: list[int]  # the rendered conversation
    spans: list[tuple[int, int]]  # [start, end) of each trained answer (ending with its EOS), in order
    images: list[ExampleImage] = field(default_factory=list)  # in prompt order
    # (position of an answer token that states a fact read off one object, the pad positions of that object's
    # cells): the look loss's targets (`look_loss`)
    looks: list[tuple[int, list[int]]] = field(default_factory=list)

    @classmethod
    def single(cls, prompt: list[int], answer: list[int]) -> Example:
        """One question: the chat-formatted prompt ids and the answer ids (ending with EOS)."""
        return cls(prompt + answer, [(len(prompt), len(prompt) + len(answer))])


@dataclass
class JointBatch:
    tokens: torch.Tensor  # [N, S] long
    positions: torch.Tensor  # [N, S] long
    kind: torch.Tensor  # [N, S] PAD / CLEAN / NOISY
    block_start: torch.Tensor  # [N, S] absolute position where a noisy slot's block starts (-1 otherwise)
    ar_targets: torch.Tensor  # [N, S] next-token target of clean slots (IGNORE elsewhere)
    dlm_targets: torch.Tensor  # [N, S] the hidden token of masked noisy slots (IGNORE elsewhere)
    dlm_weights: torch.Tensor  # [N, S] float: 1 / mask ratio on masked noisy slots
    dlm_count: int  # maskable noisy slots in the batch (the dlm loss's normalizer)
    teacher: torch.Tensor  # [N, S] slot of the clean logits that predict a masked slot's token (-1: none)
    image_index: torch.Tensor | None = None  # [N, S] row of the batch's image rows replacing the slot's embedding
    images: list[torch.Tensor] = field(default_factory=list)  # the batch's images' pixels, in row order
    cells: torch.Tensor | None = None  # [rows, labels] of the batch's image rows (IGNORE: unlabelled)
    # (row, query slot, key slots): the slot whose logits predict a looked-at token (its clean predecessor; its
    # noisy slot where masked) should attend to the key slots (the object's cells): `look_loss`
    looks: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor:
        return joint_attention_mask(self.kind, self.positions, self.block_start)


def joint_attention_mask(kind: torch.Tensor, positions: torch.Tensor, block_start: torch.Tensor) -> torch.Tensor:
    """Boolean [N, 1, S, S]: True where query slot q may attend to key slot k (rules in the module doc)."""
    qk, kk = kind[:, :, None], kind[:, None, :]
    qp, kp = positions[:, :, None], positions[:, None, :]
    qb, kb = block_start[:, :, None], block_start[:, None, :]
    clean_causal = (qk == CLEAN) & (kk == CLEAN) & (kp <= qp)
    noisy_prefix = (qk == NOISY) & (kk == CLEAN) & (kp < qb)
    noisy_block = (qk == NOISY) & (kk == NOISY) & (kb == qb)
    eye = torch.eye(kind.shape[1], dtype=torch.bool, device=kind.device)[None]
    pad_self = (qk == PAD) & eye
    return (clean_causal | noisy_prefix | noisy_block | pad_self).unsqueeze(1)


def make_batch(
    examples: list[Example],
    block_size: int,
    mask_id: int,
    eos_id: int,
    generator: torch.Generator,
    schedule: MaskSchedule = MaskSchedule(),
    pad_to: int = 1,
) -> JointBatch:
    """Tokens, targets and weights of the joint pass for one batch (one block size for the batch). Each copy
    is padded up to a multiple of `pad_to` slots: with few distinct shapes the allocator reuses its memory
    (a new shape every step fragments glibc's heap: a training worker grew by about 0.5 GB per 100 steps)."""
    rows = [_row(e, block_size, mask_id, eos_id, generator, schedule) for e in examples]
    tc = -(-max(len(r["clean"]) for r in rows) // pad_to) * pad_to
    tn = -(-max(len(r["noisy"]) for r in rows) // pad_to) * pad_to
    n, s = len(rows), tc + tn
    out = {
        "tokens": torch.full((n, s), eos_id, dtype=torch.long),
        "positions": torch.zeros((n, s), dtype=torch.long),  # padding slots sit at 0, seen by no one
        "kind": torch.full((n, s), PAD, dtype=torch.long),
        "block_start": torch.full((n, s), -1, dtype=torch.long),
        "ar_targets": torch.full((n, s), IGNORE, dtype=torch.long),
        "dlm_targets": torch.full((n, s), IGNORE, dtype=torch.long),
        "dlm_weights": torch.zeros((n, s)),
        "teacher": torch.full((n, s), -1, dtype=torch.long),
    }
    count = 0
    looks: list[tuple[int, int, list[int]]] = []
    images: list[torch.Tensor] = []
    cells: list[torch.Tensor] = []
    labels = {e.cells.shape[1] for x in examples for e in x.images if e.cells is not None}
    if len(labels) > 1:
        raise ValueError(f"the batch's images have cell labels of {sorted(labels)} columns; give them all the same")
    width = labels.pop() if labels else 1
    image_index = torch.full((n, s), -1, dtype=torch.long) if any(e.images for e in examples) else None
    row_base = 0  # the first image row of the next image
    for i, (e, r) in enumerate(zip(examples, rows)):
        if e.images:
            at: dict[int, int] = {}
            for image in e.images:
                at.update({p: row_base + k for k, p in enumerate(image.pads)})
                row_base += len(image.pads)
                images.append(image.pixels)
                if image.cells is not None and image.cells.shape != (len(image.pads), width):
                    raise ValueError(f"an image of {len(image.pads)} cells has labels of shape {tuple(image.cells.shape)}")
                cells.append(image.cells if image.cells is not None else torch.full((len(image.pads), width), IGNORE))
            slots = torch.cat([torch.arange(len(r["clean"])), tc + torch.arange(len(r["noisy"]))])
            where = torch.cat([torch.arange(len(r["clean"])), torch.tensor(r["positions"], dtype=torch.long)])
            index = torch.tensor([at.get(int(p), -1) for p in where], dtype=torch.long)
            image_index[i, slots] = index
        lc, ln = len(r["clean"]), len(r["noisy"])
        c, z = slice(0, lc), slice(tc, tc + ln)
        out["tokens"][i, c] = torch.tensor(r["clean"])
        out["positions"][i, c] = torch.arange(lc)
        out["kind"][i, c] = CLEAN
        out["ar_targets"][i, c] = torch.tensor(r["ar_targets"])
        out["tokens"][i, z] = torch.tensor(r["noisy"])
        out["positions"][i, z] = torch.tensor(r["positions"])
        out["kind"][i, z] = NOISY
        out["block_start"][i, z] = torch.tensor(r["block_start"])
        out["dlm_targets"][i, z] = torch.tensor(r["dlm_targets"])
        out["dlm_weights"][i, z] = torch.tensor(r["dlm_weights"])
        out["teacher"][i, z] = torch.tensor(r["teacher"])
        count += r["maskable"]
        for at, keys in e.looks:
            if not 0 < at < lc or not keys:
                raise ValueError(f"a look at position {at} with {len(keys)} key positions: it needs a position inside "
                                 f"a sequence of {lc} tokens after its first, and something to look at")
            looks.append((i, at - 1, keys))  # clean logits at j predict j + 1
            # noisy logits at j predict j, where it is masked (in the look's own answer: not an EOS filler of an
            # earlier answer's last block that reaches this position)
            looks += [(i, tc + j, keys) for j, (p, t, want) in enumerate(zip(r["positions"], r["noisy"],
                                                                              r["dlm_targets"]))
                      if p == at and t == mask_id and want == e.tokens[at]]
    return JointBatch(dlm_count=count, **out, image_index=image_index, images=images,
                      cells=torch.cat(cells).long() if cells else None, looks=looks)


def _row(e: Example, b: int, mask_id: int, eos_id: int, g: torch.Generator, sch: MaskSchedule) -> dict:
    """One sequence: its clean tokens and AR targets, the noisy blocks of each span, their targets and
    weights, and the clean slot whose logits the verifier reads for each masked answer token."""
    n = len(e.tokens)
    ar_targets = [IGNORE] * n
    noisy, positions, targets, weights, block_start, teacher = [], [], [], [], [], []
    maskable_total = 0
    last_start = 0  # the previous span's last block start (blocks are told apart by their start)
    for s0, s1 in e.spans:
        if not 0 < s0 < s1 <= n:
            raise ValueError(f"span {(s0, s1)} is not inside a sequence of {n} tokens after its first")
        ar_targets[s0 - 1 : s1 - 1] = e.tokens[s0:s1]
        if _uniform(g) < sch.p_aligned:
            start = s0
        else:  # a random phase: the block holding the first answer token starts up to b - 1 before it
            start = s0 - int(torch.randint(0, b, (1,), generator=g))
        start = max(start, last_start + 1, 1)
        blocks = -(-(s1 - start) // b)
        # the answer, then EOS to the end of its last block, as decoding sees it (nothing follows an EOS)
        padded = e.tokens[:s1] + [eos_id] * (start + blocks * b - s1)
        for s in range(start, start + blocks * b, b):
            chunk = padded[s : s + b]
            maskable = [j for j in range(1, b) if s + j >= s0]
            maskable_total += len(maskable)
            if _uniform(g) < sch.p_full:
                ratio, hide = 1.0, set(maskable)
            else:
                ratio = sch.r_min + (1 - sch.r_min) * _uniform(g)
                draw = torch.rand(len(maskable), generator=g) < ratio
                hide = {j for j, d in zip(maskable, draw.tolist()) if d}
                if not hide and maskable:
                    hide = {maskable[int(torch.randint(0, len(maskable), (1,), generator=g))]}
            for j, tok in enumerate(chunk):
                noisy.append(mask_id if j in hide else tok)
                positions.append(s + j)
                targets.append(tok if j in hide else IGNORE)
                weights.append(1.0 / ratio if j in hide else 0.0)
                block_start.append(s)
                # the verifier's view of a masked answer token (none past EOS: decoding stops there)
                teacher.append(s + j - 1 if j in hide and s + j < s1 else -1)
            last_start = s
    return dict(clean=list(e.tokens), ar_targets=ar_targets, noisy=noisy, positions=positions, dlm_targets=targets,
                dlm_weights=weights, block_start=block_start, teacher=teacher, maskable=maskable_total)


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


# The loss ---------------------------------------------------------------------------------------------

@dataclass
class Losses:
    total: torch.Tensor
    ar: float
    dlm: float
    cells: float | None = None  # the auxiliary probe's loss (batches with labelled images)
    looks: float | None = None  # the look loss (batches with looks, where it is on)


def cell_loss(probe: torch.nn.Module, rows: torch.Tensor, cells: torch.Tensor, heads: Sequence[int],
              weights: Sequence[float] | None = None) -> torch.Tensor | None:
    """The sum over label columns, each times its `weights[k]` (default 1), of the cross-entropy of the probe's
    logits for that column (its `heads[k]` classes, the logits in column order) on the rows where the column
    applies (not IGNORE); None where no row has a label."""
    applies = cells != IGNORE
    if not applies.any():  # (a batch's unlabelled images: one column of IGNORE each)
        return None
    if cells.shape[1] != len(heads):
        raise ValueError(f"{cells.shape[1]} label columns for a probe of {len(heads)} heads")
    weights = [1.0] * len(heads) if weights is None else weights
    logits = probe(rows).float().split(list(heads), dim=-1)
    losses = [w * F.cross_entropy(z[on], cells[on, k])
              for k, (z, w, on) in enumerate(zip(logits, weights, applies.T, strict=True)) if on.any()]
    return torch.stack(losses).sum()


def look_loss(model: NLDModel, batch: JointBatch, normed: torch.Tensor, layer: int) -> torch.Tensor | None:
    """Mean over the batch's looks of -log(the attention mass that the best-looking head of `layer` puts on the
    look's key slots), from `normed` [N, S, H] (that layer's attention input, after its input norm, not detached:
    the loss also trains the layers below, the embeddings and, through the keys, the vision tower); None where
    the batch has no looks. Why: a tiny VLM whose tower rows held each shape's rank (a linear probe read it on 97%
    of the cells of two-shape pictures) still wrote ranks at chance, because no backbone head looked at the
    shape named when it wrote one (the attention on the named shape equalled that on the other); its
    colour-reading head, asked the same shape's colour, did (README, "The embedded tiny VLM")."""
    if not batch.looks:
        return None
    attn = model.encoder.layers[layer].self_attn
    rows = sorted({r for r, _, _ in batch.looks})
    x = normed[rows]
    n, t, _ = x.shape
    cos, sin, qscale = model.rotary(batch.positions[rows], x.dtype)
    q = apply_rope(attn.q_proj(x).view(n, t, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)
    q = q * qscale[:, None, :, None]
    k = apply_rope(attn.k_proj(x).view(n, t, attn.n_kv, attn.head_dim).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
    mask = joint_attention_mask(batch.kind[rows], batch.positions[rows], batch.block_start[rows])[:, 0]
    where = {r: i for i, r in enumerate(rows)}
    losses = []
    for r, slot, keys in batch.looks:
        i = where[r]
        scores = (k[i] @ q[i, :, slot, :, None]).squeeze(-1).float() * attn.scale  # [heads, S]
        logp = scores.masked_fill(~mask[i, slot], float("-inf")).log_softmax(-1)
        losses.append(-logp[:, keys].logsumexp(-1).max())
    return torch.stack(losses).mean()


def image_rows(batch: JointBatch, vision) -> torch.Tensor:
    """[rows, hidden]: every image of the batch through `vision` (an `nld_trt.vision.tower.VisionEncoder`; the
    images of each size as one batch, rather than all under a block-diagonal mask, which would cost far more)."""
    if vision is None:
        raise ValueError("a batch with images needs the vision encoder")
    sizes: dict[tuple[int, ...], list[int]] = {}
    for i, pixels in enumerate(batch.images):
        sizes.setdefault(tuple(pixels.shape), []).append(i)
    encoded: list[torch.Tensor] = [torch.empty(0)] * len(batch.images)
    for same in sizes.values():
        for i, r in zip(same, vision.forward_batch(torch.stack([batch.images[i] for i in same]))):
            encoded[i] = r
    return torch.cat(encoded)


def input_embeddings(model: NLDModel, batch: JointBatch, vision=None, rows: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
    """The backbone's input for a batch with images: token embeddings with every image slot's replaced by its
    row (`rows`, else `image_rows(batch, vision)`); None for a text-only batch."""
    if batch.image_index is None:
        return None
    rows = image_rows(batch, vision) if rows is None else rows
    x = model.embed(batch.tokens)
    image = batch.image_index >= 0
    return torch.where(image[..., None], rows[batch.image_index.clamp(min=0)].to(x.dtype), x)


def joint_loss(model: NLDModel, batch: JointBatch, dlm_weight: float = 1.0, vision=None, probe=None,
               probe_heads: Sequence[int] = (), probe_weight: float = 1.0,
               probe_head_weights: Sequence[float] | None = None, look_weight: float = 0.0,
               look_layer: int = 2) -> Losses:
    """AR cross-entropy on the clean copy + `dlm_weight` x masked-token cross-entropy (weighted 1 / mask
    ratio) on the noisy copy, from one forward pass (`vision`: the vision encoder of a batch with images),
    + `probe_weight` x the auxiliary probe's loss on labelled image rows (`probe`: rows -> the logits of each
    label column in turn, `probe_heads` classes each, weighted `probe_head_weights`: `cell_loss`)
    + `look_weight` x the look loss of layer `look_layer` (`look_loss`)."""
    rows = image_rows(batch, vision) if batch.image_index is not None else None
    embeds = input_embeddings(model, batch, vision, rows)
    normed: list[torch.Tensor] = []
    hook = None
    if look_weight > 0 and batch.looks:
        hook = model.encoder.layers[look_layer].input_layernorm.register_forward_hook(
            lambda module, args, out: normed.append(out))
    try:
        logits = model.logits(model(batch.tokens, batch.positions, batch.mask, inputs_embeds=embeds)).float()
    finally:
        if hook is not None:
            hook.remove()
    ar = F.cross_entropy(logits.flatten(0, 1), batch.ar_targets.flatten(), ignore_index=IGNORE)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.dlm_targets.flatten(), ignore_index=IGNORE, reduction="none")
    dlm = (ce * batch.dlm_weights.flatten()).sum() / max(batch.dlm_count, 1)
    total = ar + dlm_weight * dlm
    aux = None if probe is None or rows is None else cell_loss(probe, rows, batch.cells, probe_heads, probe_head_weights)
    if aux is not None:
        total = total + probe_weight * aux
    looks = look_loss(model, batch, normed[0], look_layer) if normed else None
    if looks is not None:
        total = total + look_weight * looks
    return Losses(total, ar.item(), dlm.item(), None if aux is None else aux.item(),
                  None if looks is None else looks.item())


class PositionalLoRA(LoRA):
    """The draft adapter applied only at chosen slots ([N, S, 1] `where`): in training the noisy copy
    drafts with the adapter while the clean copy, the stand-in for the KV cache the verify passes
    wrote, runs on the plain weights, as at inference."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, where: torch.Tensor) -> None:
        super().__init__(A, B, scale)
        self.where = where

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return super().delta(x) * self.where.to(x.dtype)


def install_lora(model: NLDModel, layers: dict[int, tuple[torch.Tensor, torch.Tensor]], scale: float,
                 where: torch.Tensor | None) -> torch.Tensor | None:
    """Put trainable adapters on the model's o_proj (only at `where`); returns the `lora_rows` to pass
    to the forward, or None with `where` None (adapter removed)."""
    for i, layer in enumerate(model.encoder.layers):
        ab = layers.get(i) if where is not None else None
        layer.self_attn.lora = None if ab is None else PositionalLoRA(ab[0], ab[1], scale, where[..., None])
    return None if where is None else torch.ones(where.shape[0], dtype=torch.bool, device=where.device)


def draft_loss(model: NLDModel, batch: JointBatch, layers, scale: float, vision=None) -> torch.Tensor:
    """The drafter's objective, base frozen: the noisy copy, adapter on, matches the verifier's (clean
    copy's, adapter off) next-token distribution at every masked slot. Matching the verifier rather than
    the data is what acceptance rewards: a draft is accepted when it equals the verifier's argmax.
    `vision`: the (frozen) vision encoder of a batch with images."""
    with torch.no_grad():
        embeds = input_embeddings(model, batch, vision)
    rows = install_lora(model, layers, scale, batch.kind == NOISY)
    try:
        logits = model.logits(model(batch.tokens, batch.positions, batch.mask, lora_rows=rows,
                                    inputs_embeds=embeds)).float()
    finally:
        install_lora(model, layers, scale, None)
    sel = batch.teacher >= 0
    student = logits[sel]
    row = torch.arange(logits.shape[0])[:, None].expand_as(batch.teacher)[sel]
    teacher = torch.softmax(logits[row, batch.teacher[sel]].detach(), -1)
    ce = -(teacher * torch.log_softmax(student, -1)).sum(-1)
    return ce.mean()
