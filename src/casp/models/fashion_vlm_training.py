"""Training of fashion-vlm's projector, with the vision tower and the language model frozen.

The tower's feature maps of the training pictures are computed once; each step maps them through
the projector into the image-token slots of the prompt + answer embeddings and trains on the
answer tokens' cross-entropy, with logits taken only at those positions (the 262k-word head is
most of the cost elsewhere). The result is checked through the model's own `generate` on
validation questions. The same seed and flags give the same weights.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere autocast emulates it slowly."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def encode(processor, records: list[dict]) -> list[dict]:
    """Per record: prompt + answer token ids, the answer's positions, and the picture's pixels."""
    from casp.eval.vqa import build_prompt

    out = []
    for r in records:
        prompt = build_prompt(processor, r["question"])
        full = processor(images=r["image"], text=prompt + " " + r["answer"] + "\n", return_tensors="pt")
        n_prompt = processor(images=r["image"], text=prompt, return_tensors="pt")["input_ids"].shape[1]
        out.append({"input_ids": full["input_ids"][0], "pixel_values": full["pixel_values"][0], "start": n_prompt})
    return out


@torch.no_grad()
def tower_features(model, encoded: list[dict], batch: int = 64) -> torch.Tensor:
    """The frozen tower's flattened feature maps [n, tokens, channels], as FastVLM feeds its projector."""
    tower = model.model.vision_tower
    feats = []
    for s in tqdm(range(0, len(encoded), batch), desc="tower", leave=False):
        pixels = torch.stack([e["pixel_values"] for e in encoded[s:s + batch]])
        feats.append(tower(pixels).last_hidden_state.flatten(2).transpose(1, 2))
    return torch.cat(feats)


def answer_loss(model, encoded: list[dict], feats: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and the newline that ends them) given picture and prompt."""
    inner = model.model
    pad = model.generation_config.pad_token_id
    length = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, :len(e["input_ids"])] = e["input_ids"]
        mask[i, :len(e["input_ids"])] = 1
    embeds = inner.get_input_embeddings()(ids)
    image = (ids == model.config.image_token_id).unsqueeze(-1)
    projected = inner.multi_modal_projector(feats).to(embeds.dtype)
    embeds = embeds.masked_scatter(image, projected)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    rows, cols, targets = [], [], []
    for i, e in enumerate(encoded):
        for j in range(e["start"], len(e["input_ids"])):
            rows.append(i)
            cols.append(j - 1)
            targets.append(int(e["input_ids"][j]))
    logits = model.lm_head(hidden[rows, cols]).float()
    return F.cross_entropy(logits, torch.tensor(targets))


def train_projector(model, processor, train_records: list[dict], *, steps: int, batch_size: int, lr: float,
                    seed: int, progress: bool = True) -> dict:
    """Train `model`'s projector in place on `train_records`; return the losses and timings."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    encoded = encode(processor, train_records)
    feats = tower_features(model, encoded)
    t_features = time.perf_counter() - t0
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16() else nullcontext()
    losses = []
    bar = tqdm(range(steps), desc="projector", disable=not progress)
    for step in bar:
        picks = [int(order[(step * batch_size + k) % len(order)]) for k in range(batch_size)]
        with autocast:
            loss = answer_loss(model, [encoded[i] for i in picks], feats[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    for p in projector.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"losses": losses, "feature_seconds": round(t_features, 1),
            "train_seconds": round(time.perf_counter() - t0 - t_features, 1), "bf16": native_bf16()}


def projector_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
