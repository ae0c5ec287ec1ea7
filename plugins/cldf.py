"""CLDF refiner (Zeng et al., docs/methods/cldf.md): contrastive learning with diffusion features.

A pixel decoder is trained with a supervised contrastive loss on *seed* pixels of the
positive training slices, on top of frozen per-pixel features (the CDM's decoder
activations, docs/methods/diffusion.md, or a Table 2 backbone); each test slice's embeddings are then split
into two clusters and the cluster holding the seeds is the mask.

Map sources (the cell's ``--cam``) and the variants of Table 3:

- ``--cam amecam`` (use_mg=true, the default): the paper's CAM+MG+CL.  The refiner adds the
  MG source itself (``ctx.plugin("cams", "mg")``); ``--cam amecam+mg`` is the same cell
  content with MG named by the user;
- ``cldf[use_mg=false]`` with one CAM source: CAM+CL;
- ``--cam mg``: MG+CL.

Seeds (docs/methods/cldf.md), each source's own mask rule (CAM: minmax > 0.5; MG: Otsu):
fg = cam AND mg, bg = NOT cam AND NOT mg (CAM+CL: cam / NOT cam; MG+CL: mg / NOT mg).
Training seeds come from ``ctx.maps(source, "train")`` on the label-1 training slices and
are cached as bit masks (artifact ``cldf-seeds``); their composition (fg / bg counts, the
share of bg seeds inside tissue = non-zero input) goes to the manifest as ``cldf/seeds/train``,
the test slices' as ``cldf/seeds/test``.

Training (docs/methods/cldf.md; :mod:`wsss_bench.nn.cldf`): batches of ``common.cldf_batch`` (4)
positive slices, reshuffled per epoch, ``profile.cldf.epochs`` epochs; per batch all fg
seeds (capped at ``cldf.fg_cap``) and ``cldf.bg_per_batch`` bg seeds without replacement;
features gathered at those pixels only; frozen standardisation from the first 16 batches'
pixels; decoder D -> 16 x (decoder_depth - 1) -> out_dim; SupCon (cosine, tau); SGD lr 1.0,
momentum 0.9.  The decoder is the shared model ``cldf-decoder`` (safetensors, resumable).

Inference (docs/methods/cldf.md), every test slice: embeddings streamed through the backbone in
chunks into an (S^2, out_dim) buffer, L2-normalised, 2-means (k-means++, ``cldf.kmeans_restarts``
restarts, <= 50 iterations, tol 1e-4, seeded per slice) over all pixels
(``kmeans_region=all``, the paper) or the tissue only (``tissue``); the foreground is the
cluster with more of the slice's seed-fg pixels (none: higher mean CAM, MG for MG+CL; tie:
the smaller cluster).  Gating (docs/protocol.md §7) is applied by the runner at evaluation.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, Refiner, SliceBatch
from wsss_bench.lazy import np, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

REGIONS = ("all", "tissue")
MG_NAME = "mg"
DECODER_MODEL = "cldf-decoder"
#: slices per k-means call: about 2^18 pixels, so the (B, N, 2, O) distance tensor stays small
KMEANS_PIXELS = 2**18
#: slices per batch while building the training seeds
SEED_BATCH = 64
#: slices per backbone forward while building the feature cache
CACHE_BATCH = 16
VARIANT_NAMES = {"cam+mg": "CAM+MG+CL", "cam": "CAM+CL", "mg": "MG+CL"}


class CLDF(Refiner):
    name = "cldf"
    version = "1"
    params = {"backbone": "cdm", "use_mg": True, "out_dim": 16, "decoder_depth": 4, "tau": 0.1,
              "kmeans_region": "all", "chunk": 16384}
    description = "contrastive pixel decoder on frozen features + per-slice 2-means (Zeng et al., CLDF)"

    def validate(self) -> None:
        if not str(self.p["backbone"]).strip():
            raise self.bad_param("backbone", "is empty; name a feature backbone (cdm, resnet18, resnet50, unet-encoder)")
        if self.p["out_dim"] < 1:
            raise self.bad_param("out_dim", "must be >= 1 (the embedding dimension; paper: 16)")
        if self.p["decoder_depth"] < 1:
            raise self.bad_param("decoder_depth", "must be >= 1 (the number of Linear layers; paper: 4)")
        if not self.p["tau"] > 0:
            raise self.bad_param("tau", "must be > 0 (the SupCon temperature; paper: 0.1)")
        if self.p["kmeans_region"] not in REGIONS:
            raise self.bad_param("kmeans_region", f"is not one of {', '.join(REGIONS)}")
        if self.p["chunk"] < 1:
            raise self.bad_param("chunk", "must be >= 1 (pixels per streamed chunk at inference)")

    # ================================================================== sources and variant
    def _resolve_sources(self, ctx: "RunContext", sources: Sequence[CamSource]) -> None:
        mgs = [i for i, s in enumerate(sources) if s.name == MG_NAME]
        cams = [i for i, s in enumerate(sources) if s.name != MG_NAME]
        if len(cams) > 1 or len(mgs) > 1:
            raise PluginError(f"refiner plugin 'cldf' takes one CAM source plus optionally mg, got "
                              f"--cam {'+'.join(s.spec() for s in sources)}; use e.g. --cam amecam or --cam amecam+mg")
        self.cam_index = cams[0] if cams else None
        self.mg_index = mgs[0] if mgs else None
        self.cam = sources[cams[0]] if cams else None
        self.mg = sources[mgs[0]] if mgs else None
        self.mg_added = False
        if self.cam is None and self.mg is None:
            raise PluginError("refiner plugin 'cldf' needs a map source: --cam amecam (CAM+MG+CL), "
                              "--cam mg (MG+CL) or cldf[use_mg=false] with a CAM (CAM+CL)")
        if self.cam is not None and self.mg is not None and not self.p["use_mg"]:
            raise self.bad_param("use_mg", "is false but the sources include mg; drop '+mg' from --cam "
                                           "(CAM+CL) or set use_mg=true (CAM+MG+CL)")
        if self.cam is None:
            self.variant = "mg"
        elif self.mg is not None:
            self.variant = "cam+mg"
        elif self.p["use_mg"]:
            self.variant = "cam+mg"
            self.mg = ctx.plugin("cams", MG_NAME)
            self.mg_added = True
        else:
            self.variant = "cam"
        self.score_source = self.mg if self.variant == "mg" else self.cam  # the no-seed fallback map

    def _used_sources(self) -> list[CamSource]:
        return [s for s in (self.cam, self.mg) if s is not None and (s is self.cam or self.variant != "cam")]

    def implied_sources(self, sources: Sequence[str]) -> list[str]:
        """CAM+MG+CL (``use_mg=true``, one CAM and no ``mg``) adds the MG source: the cell is
        labelled ``amecam+mg+cldf`` however it was asked for."""
        if self.p["use_mg"] and MG_NAME not in sources and len(sources) == 1:
            return [MG_NAME]
        return []

    # ================================================================== prepare
    def prepare(self, ctx: "RunContext", sources: Sequence[CamSource]) -> None:
        from wsss_bench.nn import cldf as core

        self.ctx = ctx
        self.size = int(ctx.data.image_size)
        self._resolve_sources(ctx, tuple(sources))
        cfg = ctx.profile.cldf
        self.restarts = int(cfg.kmeans_restarts)
        self.backbone = ctx.plugin("backbones", self.p["backbone"])
        backbone_keys = ctx.upstream(self.backbone)
        seeds = self._train_seeds(ctx)
        self._seeds = seeds
        self.kmeans_seed = ctx.seed("cldf/kmeans")
        self._test_seeds: dict[int, dict[str, Any]] = {}
        self._test_pos: dict[int, int] | None = None

        dim = int(self.backbone.dim)
        epochs, batch = int(cfg.epochs), int(ctx.profile.common.cldf_batch)
        rows = seeds["rows"]
        if len(rows) == 0:
            raise PluginError("refiner plugin 'cldf': the training split has no label-1 slice to train the decoder on")
        n_iter = epochs * max(1, len(rows) // batch)
        params = {
            "variant": self.variant, "sources": [s.spec() for s in self._used_sources()],
            "backbone": self.backbone.spec(), "dim": dim, "out_dim": int(self.p["out_dim"]),
            "depth": int(self.p["decoder_depth"]), "hidden": core.HIDDEN, "tau": float(self.p["tau"]),
            "lr": float(ctx.profile.common.cldf_lr), "momentum": core.MOMENTUM, "weight_decay": core.WEIGHT_DECAY,
            "epochs": epochs, "batch": batch, "fg_cap": int(cfg.fg_cap), "bg_per_batch": int(cfg.bg_per_batch),
            "standardise_batches": core.STANDARDISE_BATCHES,
            "convergence": dict(ctx.profile.get("convergence") or {}), "eval_every": cfg.get("eval_every"),
        }
        fg_bits, bg_bits = seeds["fg"], seeds["bg"]
        pos_of = {int(r): k for k, r in enumerate(rows)}
        size = self.size
        val = self._train_seeds(ctx, "val")  # the decoder's convergence criterion scores these seeds
        # the cache holds the validation rows too, so the criterion reads cached features
        self.features, cache_state = self._feature_cache(ctx, np.union1d(rows, val["rows"]), backbone_keys)
        upstream = [seeds["key"], val["key"], *backbone_keys,
                    *([self.features.key] if self.features is not None else [])]
        gather = self._gather_from(self.features)

        def build():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed(f"init/{DECODER_MODEL}") % (2**63))
                return core.PixelDecoder(dim, int(self.p["out_dim"]), int(self.p["decoder_depth"]))

        def seeds_for(b: SliceBatch):
            k = [pos_of[int(r)] for r in b.index]
            return core.unpack_masks(fg_bits[k], size), core.unpack_masks(bg_bits[k], size)

        val_of = {int(r): k for k, r in enumerate(val["rows"])}

        def val_supcon(m) -> tuple[float | None, None]:
            """SupCon of the decoder on the validation seeds, fixed pixels per batch (lower is better)."""
            total, n = 0.0, 0
            for k, b in enumerate(ctx.data.batches(val["rows"], batch, device=ctx.device)):
                pos = [val_of[int(r)] for r in b.index]
                fg, bg = core.unpack_masks(val["fg"][pos], size), core.unpack_masks(val["bg"][pos], size)
                sel = core.sample_pixels(fg, bg, int(cfg.fg_cap), int(cfg.bg_per_batch),
                                         torch.Generator().manual_seed(1_000_003 + k))
                if sel is None:
                    continue
                coords, labels = sel
                z = m(gather(b, coords.to(ctx.device)).float())
                total += float(core.supcon_loss(z.float(), labels.to(ctx.device), float(self.p["tau"]))) * len(labels)
                n += len(labels)
            return (total / n if n else None), None

        def train(model, run):
            from wsss_bench.nn.training import Criterion, IterationBatches, rule_from_profile

            batches = IterationBatches(ctx.data, rows, batch, run.seed, run.device)
            weights, info = core.train_decoder(
                model, batches, seeds_for, gather, batches.epochs(epochs), run.seed, run.work,
                fg_cap=int(cfg.fg_cap), bg_per_batch=int(cfg.bg_per_batch), tau=float(self.p["tau"]),
                lr=float(ctx.profile.common.cldf_lr), device=run.device, progress=run.advance,
                criterion=Criterion("val SupCon loss on the validation slices' seeds (lower is better)", val_supcon,
                                    higher_is_better=False),
                rule=rule_from_profile(ctx.profile, cfg, "loss", batches.per_epoch))
            info.update(n_slices=int(len(rows)), epochs=epochs, batch=batch)
            return weights, info

        self.decoder = ctx.shared_model(DECODER_MODEL, build, train, params=params,
                                        source=[sys.modules[__name__], core], upstream=upstream, total=n_iter)
        self.decoder.eval()
        ctx.record("cldf/variant", {"variant": self.variant, "name": VARIANT_NAMES[self.variant],
                                    "cam": self.cam.spec() if self.cam is not None else None,
                                    "mg": self.mg.spec() if self.mg is not None and self.variant != "cam" else None,
                                    "mg_added_by_refiner": bool(self.mg_added), "backbone": self.backbone.spec(),
                                    "dim": dim, "kmeans_region": self.p["kmeans_region"],
                                    "kmeans_restarts": self.restarts, "feature_cache": cache_state})

    # ------------------------------------------------------------------ feature cache
    def _feature_cache(self, ctx: "RunContext", train_rows, upstream: Sequence[str]) -> tuple[Any, str]:
        """The backbone's activations of the training and test slices, cached once per task (or None).

        Built when the profile's ``cldf.feature_cache`` is on and the backbone follows the
        activation template; every decoder of the task (any variant, output dimension or
        depth) shares it, because its key holds only the backbone, its upstream and the rows.
        Returns (CachedActivations or None, a word for the manifest).
        """
        from wsss_bench.nn import backbone as nb

        if not bool(ctx.profile.cldf.feature_cache):
            return None, "off (profile cldf.feature_cache)"
        if not isinstance(self.backbone, nb.ActivationBackbone):
            return None, f"off (backbone '{self.backbone.spec()}' gives no activations: streamed)"
        rows = np.union1d(np.asarray(train_rows, dtype=np.int64), np.asarray(ctx.data.split("test"), dtype=np.int64))
        params = {"backbone": self.backbone.spec(), "dim": int(self.backbone.dim), "image_size": self.size,
                  "rows": {"train": "label 1", "val": "label 1", "test": "all", "n": int(len(rows))}}

        def build(work):
            with ctx.stage("cldf/feature-cache"), ctx.progress("CLDF feature cache", len(rows)) as advance:
                return nb.build_activation_cache(work, self.backbone.activations,
                                                 ctx.data.batches(rows, CACHE_BATCH, device=ctx.device), rows,
                                                 progress=advance)

        built = ctx.artifact("cldf-features", self.backbone, build, params=params, upstream=list(upstream),
                             source=[sys.modules[type(self.backbone).__module__], nb])
        return nb.CachedActivations(built.path, self.size, ctx.device, key=built.key), "on"

    def _gather_from(self, features: Any):
        """``gather(batch, coords)`` for decoder training: from the cache, or the backbone on the images."""
        if features is not None:
            return lambda b, coords: features.gather(np.asarray(b.index), coords)
        return lambda b, coords: self.backbone.gather(b.images.to(self.ctx.device), coords)

    # ------------------------------------------------------------------ training seeds
    def _train_seeds(self, ctx: "RunContext", split: str = "train") -> dict[str, Any]:
        """Bit-packed fg / bg seeds of every label-1 slice of ``split`` (cached artifact); the
        validation seeds score the decoder's convergence criterion."""
        from wsss_bench.nn import cldf as core

        train = np.asarray(ctx.data.split(split))
        pos = np.nonzero(np.asarray(ctx.data.labels)[train] == 1)[0]  # positions in the split
        with ctx.recording() as upstream:
            cam_maps = ctx.maps(self.cam, split) if self.cam is not None else None
            mg_maps = ctx.maps(self.mg, split) if self.variant != "cam" else None
        size = self.size

        def build(work):
            fg_all, bg_all, comp = [], [], None
            for start in range(0, len(pos), SEED_BATCH):
                p = pos[start:start + SEED_BATCH]
                cam = core.source_mask(torch.from_numpy(np.array(cam_maps[p])), self.cam.mask_rule) \
                    if cam_maps is not None else None
                mg = core.source_mask(torch.from_numpy(np.array(mg_maps[p])), self.mg.mask_rule) \
                    if mg_maps is not None else None
                fg, bg = core.seed_sets(cam, mg, self.variant)
                tissue = core.tissue_mask(torch.from_numpy(np.asarray(ctx.data.images(train[p]))))
                comp = core.merge_composition(comp, core.seed_composition(fg, bg, tissue))
                fg_all.append(core.pack_masks(fg))
                bg_all.append(core.pack_masks(bg))
            width = (size * size + 7) // 8
            np.save(work / "fg.npy", np.concatenate(fg_all) if fg_all else np.zeros((0, width), np.uint8))
            np.save(work / "bg.npy", np.concatenate(bg_all) if bg_all else np.zeros((0, width), np.uint8))
            np.save(work / "rows.npy", train[pos].astype(np.int64))
            return {"composition": comp or {}}

        params = {"variant": self.variant, "sources": [s.spec() for s in self._used_sources()],
                  "rules": [s.mask_rule for s in self._used_sources()], "split": split, "labels": "positive"}
        built = ctx.artifact("cldf-seeds", "cldf-seeds", build, params=params, upstream=upstream,
                             source=[sys.modules[__name__], core])
        comp = _read_meta(built).get("composition")
        if comp is not None:
            ctx.record(f"cldf/seeds/{split}", comp)
        return {"fg": np.load(built.path / "fg.npy", mmap_mode="r"), "bg": np.load(built.path / "bg.npy", mmap_mode="r"),
                "rows": np.load(built.path / "rows.npy"), "key": built.key}

    def train_seeds(self) -> tuple[Any, Any, Any] | None:
        """(rows, fg, bg) of the training seeds made in ``prepare`` (for the runner's report)."""
        from wsss_bench.nn import cldf as core

        seeds = getattr(self, "_seeds", None)
        if seeds is None:
            return None
        return (np.asarray(seeds["rows"]), core.unpack_masks(np.asarray(seeds["fg"]), self.size).numpy(),
                core.unpack_masks(np.asarray(seeds["bg"]), self.size).numpy())

    # ================================================================== refine
    def _maps_of(self, source: CamSource, batch: SliceBatch) -> "Tensor":
        """``source``'s maps of ``batch``: from the cached test maps when they cover it, else computed."""
        ctx = self.ctx
        if self._test_pos is None:
            self._test_pos = {int(r): k for k, r in enumerate(np.asarray(ctx.data.split("test")))}
        rows = [self._test_pos.get(int(r)) for r in batch.index]
        if all(r is not None for r in rows):
            return torch.from_numpy(np.array(ctx.maps(source, "test")[rows])).to(ctx.device)
        grad = torch.no_grad() if getattr(source, "no_grad", False) else torch.enable_grad()
        with grad, ctx.acting(source):
            return source.maps(batch).detach().float()

    def seeds(self, batch: SliceBatch, maps: Sequence["Tensor"]) -> tuple["Tensor", "Tensor", "Tensor"]:
        """(fg, bg, score) of a batch: the variant's seeds and the fallback map for the fg rule."""
        from wsss_bench.nn import cldf as core

        cam_maps = maps[self.cam_index].float() if self.cam is not None else None
        if self.variant == "cam":
            mg_maps = None
        elif self.mg_index is not None:
            mg_maps = maps[self.mg_index].float()
        else:
            mg_maps = self._maps_of(self.mg, batch).float()
        cam = core.source_mask(cam_maps, self.cam.mask_rule) if cam_maps is not None else None
        mg = core.source_mask(mg_maps, self.mg.mask_rule) if mg_maps is not None else None
        fg, bg = core.seed_sets(cam, mg, self.variant)
        score = mg_maps if self.variant == "mg" else cam_maps
        return fg, bg, score

    def embed(self, image: "Tensor", row: int | None = None) -> "Tensor":
        """(S^2, out_dim) decoder embeddings of one image (C, S, S), streamed in chunks.

        With the feature cache and a cached slice ``row``, the features come from the cache.
        """
        from wsss_bench.nn import cldf as core

        chunk = int(self.p["chunk"])
        feats = getattr(self, "features", None)
        if feats is not None and row is not None and int(row) in feats.pos:
            stream = feats.stream(int(row), chunk)
        else:
            stream = self.backbone.stream(image, chunk)
        return core.embed_stream(stream, self.size ** 2, self.decoder)

    def refine(self, batch: SliceBatch, maps: Sequence["Tensor"], sources: Sequence[CamSource]) -> "Tensor":
        from wsss_bench.nn import cldf as core
        from wsss_bench.nn.training import mix

        if isinstance(maps, torch.Tensor) or len(maps) != len(sources):
            raise PluginError("refiner plugin 'cldf' expects one (B, S, S) map tensor per source")
        images = batch.images.to(self.ctx.device).float()
        fg, bg, score = self.seeds(batch, maps)
        tissue = core.tissue_mask(images)
        for i, row in enumerate(np.asarray(batch.index)):  # per slice: refining a slice twice counts it once
            self._test_seeds[int(row)] = core.seed_composition(fg[i:i + 1].cpu(), bg[i:i + 1].cpu(),
                                                               tissue[i:i + 1].cpu())
        total = None
        for comp in self._test_seeds.values():
            total = core.merge_composition(total, comp)
        self.ctx.record("cldf/seeds/test", total)
        b, s = images.shape[0], self.size
        per = max(1, KMEANS_PIXELS // (s * s))
        out = []
        for start in range(0, b, per):
            sl = slice(start, min(b, start + per))
            rows = np.asarray(batch.index)[sl]
            emb = torch.stack([self.embed(img, int(r)) for img, r in zip(images[sl], rows)])  # (b', S^2, out_dim)
            valid = tissue[sl].reshape(emb.shape[0], -1) if self.p["kmeans_region"] == "tissue" else None
            seeds = [mix(self.kmeans_seed, int(r)) for r in np.asarray(batch.index)[sl]]
            masks = core.segment(emb, fg[sl].reshape(emb.shape[0], -1), score[sl].reshape(emb.shape[0], -1),
                                 seeds, valid, restarts=self.restarts)
            out.append(masks.reshape(-1, s, s))
        return torch.cat(out).to(images.device)


def _read_meta(built) -> dict:
    """The dict the artifact's ``build`` returned (stored by the cache in its metadata file)."""
    from wsss_bench.cache import read_meta

    return read_meta(built.path).get("meta") or {}


@hookimpl
def register_refiners(register):
    register(CLDF)
