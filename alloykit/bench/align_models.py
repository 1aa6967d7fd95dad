"""Small plain-torch image models, their training and evaluation, for the model-alignment benchmark.

The protocol is the CLIP-head one of ZipIt! and MuDSC (``specs/mudsc-and-alignment.md`` §2.5):
every model maps an image to an embedding, and logits are ``scale · cos(embedding, class
vector)`` against one frozen set of class vectors shared by all models (there a CLIP text
embedding of each class name, here fixed random unit vectors, :func:`class_embeddings`). So
models trained on disjoint label groups share an output space and their last layer needs no
permutation. :func:`evaluate` reports joint and per-task accuracy as MuDSC's
``evaluate_cliphead_alltasks`` does, and :func:`ensemble_logits` is its ``SpoofModel`` upper bound.

The models are written for the alignment code, which traces them with
``torch.fx.symbolic_trace``: standard modules only, no data-dependent control flow, attention
written out with ops. Each one is initialised from its own ``torch.Generator`` seeded with
``seed`` (built on the meta device, then materialised and initialised), so two models with the
same seed are identical whatever the global RNG state, and building one leaves that state alone.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from alloykit.bench.align_data import Task
from alloykit.errors import ParameterError

# ------------------------------------------------------------------------------------------- init


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Materialise ``model`` (built on the meta device) on the CPU and initialise it from ``seed``.

    Linear and Conv2d: PyTorch's default (weight Kaiming-uniform with a = √5, bias uniform in
    ±1/√fan_in), drawn from a ``torch.Generator`` seeded with ``seed``, module by module in
    ``model.modules()`` order. Norm layers: weight 1, bias 0, running statistics reset. Other
    parameters (the ViT's class token and position embedding): truncated normal, std 0.02 (timm).
    """
    g = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    done: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            if m.bias is not None:
                bound = 1 / math.sqrt(m.weight[0].numel())
                m.bias.uniform_(-bound, bound, generator=g)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            m.reset_parameters()
        else:
            continue
        done |= {id(p) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if id(p) not in done:
            nn.init.trunc_normal_(p, std=0.02, generator=g)
    return model


# ------------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    """Flatten → (Linear → ReLU) per hidden width → Linear(dim)."""

    def __init__(
        self,
        hidden: Sequence[int] = (256, 256),
        dim: int = 32,
        *,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        bias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.device("meta"):
            layers: list[nn.Module] = [nn.Flatten()]
            d = math.prod(in_shape)
            for h in hidden:
                layers += [nn.Linear(d, h, bias=bias), nn.ReLU()]
                d = h
            layers.append(nn.Linear(d, dim, bias=bias))
            self.layers = nn.Sequential(*layers)
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, → ReLU (He et al. 2016).

    The shortcut is a 1×1 conv + BN where the stride or width changes, the identity otherwise.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (the ResNet-20 family of ZipIt!/MuDSC, at small width).

    Stem conv3×3(width) → BN → ReLU; stage i has ``blocks[i]`` :class:`BasicBlock` of
    ``width · 2^i`` channels, the first of stages i > 0 with stride 2; global average pooling →
    Linear(dim). ResNet-20×8 would be ``ResNet(width=128, blocks=(3, 3, 3))``.
    """

    def __init__(
        self,
        width: int = 16,
        blocks: Sequence[int] = (2, 2, 2),
        dim: int = 32,
        *,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not blocks or min(blocks) < 1:
            raise ParameterError(f"blocks={blocks!r}: expected at least one stage of at least one block")
        with torch.device("meta"):
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            stages, cin = [], width
            for i, n in enumerate(blocks):
                cout = width * 2**i
                stage = [
                    BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)
                ]
                stages.append(nn.Sequential(*stage))
                cin = cout
            self.stages = nn.Sequential(*stages)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(cin, dim)
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(self.flatten(self.pool(x)))


class GroupNormCNN(nn.Module):
    """(conv3×3 → GroupNorm(groups) → ReLU) × depth, max-pooling after the first two, then
    global average pooling → Linear(dim).

    Conv i has ``width · 2^max(0, i − 1)`` channels (depth 3: width, width, 2·width), so the
    GroupNorm blocks are whole groups of ``channels / groups`` (ZipIt!/MuDSC's ResNet-20-GN
    setting, at small size).
    """

    def __init__(
        self,
        width: int = 32,
        groups: int = 4,
        dim: int = 32,
        *,
        depth: int = 3,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        chans = [width * 2 ** max(0, i - 1) for i in range(depth)]
        if depth < 1 or any(c % groups for c in chans):
            raise ParameterError(
                f"width={width}, groups={groups}, depth={depth}: expected depth >= 1 and channel counts "
                f"{chans} divisible by groups"
            )
        with torch.device("meta"):
            layers: list[nn.Module] = []
            cin = in_channels
            for i, c in enumerate(chans):
                layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.GroupNorm(groups, c), nn.ReLU()]
                if i < 2:
                    layers.append(nn.MaxPool2d(2))
                cin = c
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(cin, dim)
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class Attention(nn.Module):
    """Multi-head self-attention written out with ops (timm's layout), traceable by torch.fx.

    Fused: ``qkv`` = Linear(width, 3·width), its output read as (B, N, 3, heads, head_dim).
    Split (``fused_qkv=False``): ``q``, ``k``, ``v`` Linears, each read as (B, N, heads, head_dim).
    softmax(q kᵀ · head_dim^-½) v, heads concatenated, → ``proj``.
    """

    def __init__(self, width: int, heads: int, fused_qkv: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ParameterError(f"width={width}, heads={heads}: expected width divisible by heads")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.scale = self.head_dim**-0.5
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        if self.fused_qkv:  # fixed at construction: not data-dependent
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = self.q(x).reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
            k = self.k(x).reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
            v = self.v(x).reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.width)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (fc1 → GELU → fc2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, fused_qkv: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, fused_qkv)
        self.norm2 = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small ViT: conv patch embedding, class token, learned position embedding, ``depth``
    pre-norm :class:`Block`, final LayerNorm, Linear(dim) on the class token.

    Attribute names follow timm (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``,
    ``blocks.i.attn.proj``, ``blocks.i.mlp.fc1``, ``norm``, ``head``), the MuDSC ViT-S setting at
    28×28 with ``(28 / patch)²`` patches.
    """

    def __init__(
        self,
        patch: int = 7,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        dim: int = 32,
        fused_qkv: bool = True,
        *,
        mlp_ratio: int = 4,
        image_size: int = 28,
        in_channels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ParameterError(f"patch={patch}: expected a divisor of image_size={image_size}")
        n_tokens = (image_size // patch) ** 2 + 1
        with torch.device("meta"):
            self.patch_embed = nn.Conv2d(in_channels, width, patch, patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, width))
            self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, fused_qkv) for _ in range(depth)))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, dim)
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, width)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# Default configurations, each trained on 10k 28×28 images for 3 epochs (batch 128) in at most ~20 s
# on one busy CPU core (MLP ~1 s, ViTs ~8 s, CNNs ~15-20 s); measured with torch.set_num_threads(1)
# while another job held both cores. Override by keyword: ARCHITECTURES["resnet"](seed=1, width=16).
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": partial(MLP, hidden=(256, 256)),
    "resnet": partial(ResNet, width=8, blocks=(1, 1, 1)),
    "gn_cnn": partial(GroupNormCNN, width=24, groups=4, depth=4),
    "vit": partial(TinyViT, patch=7, width=64, depth=2, heads=4),
    "vit_split": partial(TinyViT, patch=7, width=64, depth=2, heads=4, fused_qkv=False),
}


# ------------------------------------------------------------------------------------ class head


def class_embeddings(n_classes: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed random unit vectors (n_classes, dim), one per class: the frozen shared head.

    Stands in for the CLIP text embeddings ("a photo of a {class}") that ZipIt! and MuDSC train
    every model against, so models of disjoint tasks share one output space.
    """
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)


def logits(embedding: torch.Tensor, class_emb: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """``scale · cos(embedding, class vector)`` for every class: (B, dim), (C, dim) → (B, C)."""
    return scale * F.normalize(embedding, dim=-1) @ F.normalize(class_emb, dim=-1).T


# -------------------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    class_emb: torch.Tensor,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.01,
    scale: float = 10.0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``model`` in place on (x, y); return ``{"loss", "epoch_loss", "steps", "seconds"}``.

    AdamW at a constant ``lr``; cross-entropy of :func:`logits` over *all* rows of ``class_emb``
    (the dataset's classes), though ``y`` holds only this task's classes: the ZipIt!/MuDSC
    CLIP-head protocol. Batches are reshuffled each epoch from a generator seeded with ``seed``,
    so a run is deterministic given the model's init and ``seed``. ``loss`` is the loss of every
    step, ``epoch_loss`` the example-weighted mean per epoch. ``log`` gets one line per epoch.
    The model is left in eval mode.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ParameterError(f"x has {len(x)} examples and y {len(y)}: expected the same, non-zero number")
    if int(y.max()) >= len(class_emb) or int(y.min()) < 0:
        raise ParameterError(
            f"labels in [{int(y.min())}, {int(y.max())}]: class_emb has {len(class_emb)} rows"
        )
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    epoch_losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(logits(model(x[idx]), class_emb, scale), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            total += loss.item() * len(idx)
        epoch_losses.append(total / len(y))
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {epoch_losses[-1]:.4f}")
    model.eval()
    return {
        "loss": losses,
        "epoch_loss": epoch_losses,
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def scores(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    class_emb: torch.Tensor,
    *,
    scale: float = 10.0,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N, C), in batches: :func:`logits` of a module's embeddings (in eval mode,
    restored after), or what a plain callable returns (it must give (B, C) scores itself)."""
    if isinstance(model_or_fn, nn.Module):
        was_training = model_or_fn.training
        model_or_fn.eval()
        try:
            return torch.cat(
                [
                    logits(model_or_fn(x[i : i + batch_size]), class_emb, scale)
                    for i in range(0, len(x), batch_size)
                ]
            )
        finally:
            model_or_fn.train(was_training)
    return torch.cat([model_or_fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    class_emb: torch.Tensor,
    tasks: Sequence[Task],
    *,
    scale: float = 10.0,
    batch_size: int = 1024,
) -> dict:
    """Joint and per-task accuracy, as MuDSC's ``evaluate_cliphead_alltasks``.

    On the examples of (x, y) whose label is in some task:

    * ``"joint"``: accuracy of the argmax over the classes of all tasks together;
    * ``"per_task"``: {task name: accuracy on the examples of that task's classes, argmax over
      that task's classes only};
    * ``"per_task_mean"``: the unweighted mean of ``per_task`` ("Per Task Avg").

    ``model_or_fn``: a module mapping images to embeddings (scored with :func:`logits`), or a
    callable returning (B, C) scores, e.g. ``lambda x: ensemble_logits(models, class_emb, tasks, x)``.
    """
    s = scores(model_or_fn, x, class_emb, scale=scale, batch_size=batch_size)
    if s.shape != (len(y), len(class_emb)):
        raise ParameterError(f"scores of shape {tuple(s.shape)}: expected ({len(y)}, {len(class_emb)})")
    every = torch.tensor(sorted(c for t in tasks for c in t.classes))
    keep = torch.isin(y, every)
    if not keep.any():
        raise ParameterError("no example of (x, y) belongs to a task's classes")
    joint = (every[s[keep][:, every].argmax(1)] == y[keep]).float().mean().item()
    per_task = {}
    for t in tasks:
        ids = torch.tensor(sorted(t.classes))
        rows = torch.isin(y, ids)
        if not rows.any():
            raise ParameterError(f"task {t.name!r}: no example of its classes {t.classes} in (x, y)")
        per_task[t.name] = (ids[s[rows][:, ids].argmax(1)] == y[rows]).float().mean().item()
    return {"joint": joint, "per_task": per_task, "per_task_mean": sum(per_task.values()) / len(per_task)}


@torch.no_grad()
def ensemble_logits(
    models: Sequence[nn.Module],
    class_emb: torch.Tensor,
    tasks: Sequence[Task],
    x: torch.Tensor,
    *,
    scale: float = 10.0,
    batch_size: int = 1024,
) -> torch.Tensor:
    """The ensemble upper bound of ZipIt!/MuDSC (``SpoofModel``): model i scores task i's classes.

    Column c of the result (N, C) holds, for c in task i, the log-softmax of model i's logits over
    task i's classes only; columns of classes in no task are −inf. The joint argmax is therefore
    the class of the most confident model (highest softmax probability), and the argmax within
    task i is model i's own prediction, so its per-task accuracy equals the individual models'.
    """
    if len(models) != len(tasks):
        raise ParameterError(f"{len(models)} models and {len(tasks)} tasks: expected one model per task")
    out = torch.full((len(x), len(class_emb)), float("-inf"))
    for model, t in zip(models, tasks, strict=True):
        ids = torch.tensor(sorted(t.classes))
        s = scores(model, x, class_emb, scale=scale, batch_size=batch_size)
        out[:, ids] = s[:, ids].log_softmax(dim=1)
    return out
