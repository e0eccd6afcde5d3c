"""Training of fashion-vlm's projector, with the vision tower and the language model frozen.

Two stages, both on the training split's panels:
1. alignment: each cell's visual tokens are fitted (mean squared error) to the language model's own input
   embedding of the cell's class word ("nothing" for an empty cell); cheap, no language-model pass;
2. answers: each step maps the tower's features through the projector into the image-token slots of the
   prompt + answer embeddings and trains on the answer tokens' cross-entropy, logits taken only at those
   positions (the 262k-word head would be most of the cost elsewhere).
The tower's feature maps are computed once. The result is checked through the model's own `generate`
on validation questions. The same seed and flags give the same weights.
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


def encode(processor, panels: list[dict]) -> list[dict]:
    """Per panel: the picture's pixels, the prompt's ids up to its last image token (the same for every
    question), and per question the rest of prompt + answer with the position where the answer starts."""
    from casp.eval.vqa import build_prompt

    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    out = []
    for panel in panels:
        first = panel["questions"][0]
        full = processor(images=panel["image"], text=build_prompt(processor, first["question"]) + " "
                         + first["answer"] + "\n", return_tensors="pt")
        ids = full["input_ids"][0]
        prefix = ids[:int((ids == image_id).nonzero().max()) + 1]
        segments = []
        for q in panel["questions"]:
            prompt = build_prompt(processor, q["question"])
            tail = prompt[prompt.rindex(processor.image_token) + len(processor.image_token):]
            head = tokenizer(tail, add_special_tokens=False)["input_ids"]
            answer = tokenizer(tail + " " + q["answer"] + "\n", add_special_tokens=False)["input_ids"]
            if answer[:len(head)] != head:
                raise ValueError(f"the answer {q['answer']!r} changes the prompt's tokens")
            segments.append({"ids": torch.tensor(answer), "start": len(head)})
        if not torch.equal(torch.cat([prefix, segments[0]["ids"]]), ids):
            raise ValueError("the prompt's text tokenizes differently apart from its picture")
        out.append({"prefix": prefix, "pixel_values": full["pixel_values"], "segments": segments})
    return out


@torch.no_grad()
def tower_features(model, encoded: list[dict], batch: int = 16) -> torch.Tensor:
    """The frozen tower's flattened feature maps of each record's images, in prompt order [n, tokens, channels]."""
    tower = model.model.vision_tower
    feats = []
    for s in tqdm(range(0, len(encoded), batch), desc="tower", leave=False):
        chunk = encoded[s:s + batch]
        pixels = torch.cat([e["pixel_values"] for e in chunk])
        maps = tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
        feats.append(maps.reshape(len(chunk), -1, maps.shape[-1]))
    return torch.cat(feats)


def word_vectors(model, tokenizer, words: list[str]) -> torch.Tensor:
    """The language model's input embedding of each word (" word", mean over its tokens) [len(words), hidden]."""
    embed = model.model.get_input_embeddings()
    with torch.no_grad():
        return torch.stack([embed(torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"]]))[0]
                            .mean(0) for w in words])


def align_projector(model, tokenizer, records: list[dict], feats: torch.Tensor, *, steps: int, lr: float,
                    seed: int, batch_size: int = 64) -> list[float]:
    """Stage 1: fit each cell's tokens to the embedding of its class word; returns the losses."""
    from casp.data.fashion_mnist import CLASSES

    targets = word_vectors(model, tokenizer, [*CLASSES, "nothing"])
    cells = len(records[0]["labels"])
    per_cell = feats.reshape(len(records) * cells, -1, feats.shape[-1])
    labels = torch.tensor([len(CLASSES) if k is None else k for r in records for k in r["labels"]])
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="align", leave=False):
        pick = torch.randint(0, len(labels), (batch_size,), generator=g)
        out = projector(per_cell[pick])
        loss = F.mse_loss(out, targets[labels[pick]][:, None].expand_as(out))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def answer_loss(model, encoded: list[dict], feats: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and the newline that ends them) given picture and prompt.

    Each panel's picture and cell labels run once; its questions continue from that cache, each seeing
    exactly what it would see alone, so one pass trains on all of them.
    """
    inner = model.model
    lm = inner.language_model
    prefix = torch.stack([e["prefix"] for e in encoded])
    per_panel = len(encoded[0]["segments"])
    if any(len(e["segments"]) != per_panel for e in encoded):
        raise ValueError("every panel of a batch needs as many questions")
    embeds = inner.get_input_embeddings()(prefix)
    image = (prefix == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image, inner.multi_modal_projector(feats).to(embeds.dtype))
    cache = lm(inputs_embeds=embeds, use_cache=True).cache
    cache.batch_repeat_interleave(per_panel)
    segments = [s for e in encoded for s in e["segments"]]
    length = max(len(s["ids"]) for s in segments)
    pad = model.generation_config.pad_token_id
    ids = torch.full((len(segments), length), pad, dtype=torch.long)
    mask = torch.zeros((len(segments), prefix.shape[1] + length), dtype=torch.long)
    mask[:, :prefix.shape[1]] = 1
    rows, cols, targets = [], [], []
    for i, s in enumerate(segments):
        ids[i, :len(s["ids"])] = s["ids"]
        mask[i, prefix.shape[1]:prefix.shape[1] + len(s["ids"])] = 1
        for j in range(s["start"], len(s["ids"])):
            rows.append(i)
            cols.append(j - 1)
            targets.append(int(s["ids"][j]))
    hidden = lm(inputs_embeds=inner.get_input_embeddings()(ids), attention_mask=mask,
                cache=cache).last_hidden_state
    logits = model.lm_head(hidden[rows, cols]).float()
    return F.cross_entropy(logits, torch.tensor(targets))


def train_projector(model, processor, train_panels: list[dict], *, steps: int, batch_size: int, lr: float,
                    seed: int, align_steps: int = 600, align_lr: float = 1e-3, progress: bool = True) -> dict:
    """Train `model`'s projector in place on `train_panels` (alignment, then answers); return losses and timings.

    `train_panels` are `casp.data.fashion_scenes.panels`; a step takes `batch_size` panels and all their
    questions."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    encoded = encode(processor, train_panels)
    feats = tower_features(model, encoded)
    t_features = time.perf_counter() - t0
    align = align_projector(model, processor.tokenizer, train_panels, feats, steps=align_steps, lr=align_lr,
                            seed=seed)
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
    return {"losses": losses, "align_losses": align, "feature_seconds": round(t_features, 1),
            "train_seconds": round(time.perf_counter() - t0 - t_features, 1), "bf16": native_bf16()}


def projector_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
