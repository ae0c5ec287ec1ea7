"""AME-CAM (Chen et al. 2023), docs/methods/amecam.md: the ``amecam`` CAM source.

Three trained stages, each its own shared model (cached safetensors, resumable, memoised),
chained by their artifact keys so that a stage is retrained only when it or something it
depends on changes:

- ``amecam-stage0``: SimCLR pre-training of the ResNet-18-IN encoder.  Runs only where the
  profile's ``amecam.simclr_epochs`` > 0 (the paper profile); elsewhere it is skipped and
  the manifest says so (``amecam/stage0``).
- ``amecam-stage1``: the multi-exit classifier (four 1x1-convolution exits whose spatial
  means are the exit logits, deep-weighted BCE; best validation AUC of sigma(logit_4)),
  initialised from the stage-0 encoder by parameter name when stage 0 ran.
- ``amecam-stage2``: the attention aggregation net trained with the C^2AM contrastive
  objective while stage 1 stays frozen in eval (labels unused; last epoch).  Its upstream
  is stage 1's key only, so ``amecam[stage2_epochs=N]`` retrains stage 2 alone.

Final map: avg = mean(m_1..m_4, A) and cam = minmax(s * avg).  The polarity s is decided
once per task and seed by the deletion test (docs/methods/amecam.md, [inferred]) on <= 256 seeded
label-1 training slices: delete the region minmax(s * avg) > 0.5 (set it to 0) and keep
the s whose deletion lowers sigma(logit_4) more; a difference below 0.01 gives +1 with a
warning.  It is a small cached artifact (``amecam-polarity``) and goes to the manifest with
both drops (``amecam/polarity``).  The reference code's hard-coded ``1 - minmax(avg)`` is
not copied.

Mask: minmax(map) > 0.5 (docs/protocol.md section 6).  Profile values: ``amecam`` section
(widths, output stride, SimCLR / stage-1 / stage-2 epochs, batch).  A profile whose deepest
feature map would be 1x1 (InstanceNorm cannot normalise it) or whose batch is below 4
(SimMax ranks within a batch) is refused before anything trains.
"""
from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import np, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext


class AmeCam(CamSource):
    name = "amecam"
    version = "1"
    params = {"stage2_epochs": 0}  # 0 = the profile's amecam.stage2_epochs
    mask_rule = "cam"
    no_grad = True
    description = ("AME-CAM: multi-exit ResNet-18-IN, attention aggregation trained with C^2AM, "
                   "polarity by a deletion test")

    def validate(self) -> None:
        if int(self.p["stage2_epochs"]) < 0:
            raise self.bad_param("stage2_epochs", "must be >= 1 (or 0 for the profile's amecam.stage2_epochs)")

    # ------------------------------------------------------------------ configuration
    def config(self, ctx: "RunContext") -> dict[str, Any]:
        """The profile's ``amecam`` section with this instance's overrides, checked."""
        from wsss_bench.nn import amecam as am

        cfg = dict(ctx.profile.amecam)
        if int(self.p["stage2_epochs"]):
            cfg["stage2_epochs"] = int(self.p["stage2_epochs"])
        size = int(ctx.data.image_size)
        problems = am.geometry_problems(size, cfg)
        if problems:
            key, why = problems[0]
            raise PluginError(f"{self.kind} plugin '{self.name}': profile '{ctx.profile.name}' value "
                              f"amecam.{key} {why}")
        n_train = len(ctx.data.split("train"))
        if n_train < am.MIN_BATCH:
            raise PluginError(f"{self.kind} plugin '{self.name}': the training split holds {n_train} slice(s); "
                              f"stage 2's SimMax needs batches of >= {am.MIN_BATCH} (use more cases)")
        return cfg

    # ------------------------------------------------------------------ stages
    def prepare(self, ctx: "RunContext") -> None:
        import sys

        from wsss_bench.nn import amecam as am
        from wsss_bench.nn.training import rule_from_profile, rule_params

        self.ctx = ctx
        cfg = self.config(ctx)
        conv = rule_params(ctx.profile, cfg)
        channels, device, bf16 = int(ctx.task.channels), ctx.device, bool(ctx.bf16)
        arch = {"arch": "resnet18-instancenorm", "channels": list(am.widths(cfg)),
                "output_stride": int(cfg["output_stride"]), "in_chans": channels,
                "image_size": int(ctx.data.image_size)}
        src = [sys.modules[am.__name__]]
        n_train = len(ctx.data.split("train"))
        per_epoch = lambda batch: max(1, n_train // int(batch))  # noqa: E731 (IterationBatches' epoch)

        def seeded(name, make):
            def build():
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(ctx.seed(f"init/{name}") % (2**63))
                    return make()
            return build

        # stage 0: SimCLR (paper profile only)
        upstream1: list[str] = []
        simclr_state = None
        if int(cfg["simclr_epochs"]) > 0:
            params0 = {**arch, "simclr_epochs": int(cfg["simclr_epochs"]), "batch": am.SIMCLR_BATCH_FACTOR *
                       int(cfg["batch"]), "lr": am.SIMCLR_LR, "temperature": am.SIMCLR_TEMPERATURE,
                       "jitter": [am.JITTER, am.JITTER_P], "flips": bool(ctx.task.flips)}
            simclr = ctx.shared_model(
                "amecam-stage0", seeded("amecam-stage0", lambda: am.SimCLRNet(cfg, channels)),
                lambda model, run: am.train_simclr(model, ctx.data, cfg, run.work, run.seed, run.device,
                                                   flips=ctx.task.flips, bf16=bf16, progress=run.advance),
                params=params0, source=src, upstream=(),
                total=int(cfg["simclr_epochs"]) * per_epoch(am.SIMCLR_BATCH_FACTOR * int(cfg["batch"])))
            simclr_state = {k: v.detach().cpu() for k, v in simclr.state_dict().items()}
            upstream1.append(ctx.shared_model_key("amecam-stage0"))
            ctx.record("amecam/stage0", {"simclr_epochs": int(cfg["simclr_epochs"]), "encoder": "loaded by name"})
        else:
            ctx.record("amecam/stage0", {"simclr_epochs": 0, "encoder": "random init (stage 0 skipped)"})

        # stage 1: multi-exit classifier
        def train1(model, run):
            if simclr_state is not None:
                am.load_encoder(model, simclr_state)
            return am.train_stage1(model, ctx.data, cfg, run.work, run.seed, run.device, bf16=bf16,
                                   progress=run.advance,
                                   rule=rule_from_profile(ctx.profile, cfg, "score", per_epoch(cfg["batch"])))

        params1 = {**arch, "stage1_epochs": int(cfg["stage1_epochs"]), "batch": int(cfg["batch"]), "lr": am.LR,
                   "exit_weights": list(am.EXIT_WEIGHTS), "pretrained": simclr_state is not None, **conv}
        stage1 = ctx.shared_model("amecam-stage1", seeded("amecam-stage1", lambda: am.MultiExitResNet(cfg, channels)),
                                  train1, params=params1, source=src, upstream=upstream1,
                                  total=int(cfg["stage1_epochs"]) * per_epoch(cfg["batch"]))
        key1 = ctx.shared_model_key("amecam-stage1")

        # stage 2: attention aggregation, stage 1 frozen
        params2 = {"stage2_epochs": int(cfg["stage2_epochs"]), "batch": int(cfg["batch"]), "lr": am.LR,
                   "att_width": am.ATT_WIDTH, "rank_alpha": am.RANK_ALPHA, "clamp": list(am.SIM_CLAMP), **conv}
        stage2 = ctx.shared_model(
            "amecam-stage2", seeded("amecam-stage2", lambda: am.AttentionAggregator()),
            lambda model, run: am.train_stage2(model, stage1, ctx.data, cfg, run.work, run.seed, run.device,
                                               bf16=bf16, progress=run.advance,
                                               rule=rule_from_profile(ctx.profile, cfg, "loss",
                                                                      per_epoch(cfg["batch"]))),
            params=params2, source=src, upstream=[key1],
            total=int(cfg["stage2_epochs"]) * per_epoch(cfg["batch"]))
        key2 = ctx.shared_model_key("amecam-stage2")
        self.net = am.AmeCamNet(stage1, stage2).to(device).eval()

        # polarity by the deletion test
        self.polarity = self._polarity(ctx, [key1, key2], src)
        self.s = int(self.polarity["s"])
        ctx.record("amecam/polarity", self.polarity)

    def _polarity(self, ctx: "RunContext", upstream: list[str], src: list[Any]) -> dict[str, Any]:
        from wsss_bench.cache import atomic_write_json
        from wsss_bench.nn import amecam as am

        def build(work):
            rows = am.polarity_rows(np.asarray(ctx.data.labels), ctx.data.split("train"),
                                    ctx.generator("amecam/polarity"))
            if len(rows) == 0:
                rec = {"s": 1, "drop_plus": None, "drop_minus": None, "tied": True, "n_slices": 0,
                       "rule": "no label-1 training slice: s = +1"}
            else:
                images = torch.from_numpy(np.asarray(ctx.data.images(rows))).to(ctx.device)
                with ctx.stage("amecam/polarity"), torch.no_grad(), ctx.autocast():
                    rec = am.polarity_test(images, self.net, self.net.logit4)
            atomic_write_json(work / "polarity.json", rec)
            return {"polarity": rec}

        built = ctx.artifact("amecam-polarity", self, build,
                             params={"slices": am.POLARITY_SLICES, "tie": am.POLARITY_TIE},
                             upstream=upstream, source=[type(self), *src])
        rec = json.loads((built.path / "polarity.json").read_text())
        if built.hit and rec.get("tied"):
            warnings.warn(f"amecam: the cached deletion test could not tell the polarity apart "
                          f"(drop+ {rec['drop_plus']}, drop- {rec['drop_minus']}); using s = +1", stacklevel=2)
        return rec

    # ------------------------------------------------------------------ maps
    def maps(self, batch: SliceBatch) -> "_torch.Tensor":
        from wsss_bench.nn.amecam import final_cam

        with torch.no_grad(), self.ctx.autocast():
            avg = self.net(batch.images)  # (B, S, S)
        return final_cam(avg.float(), self.s)  # (B, S, S) in [0, 1]


@hookimpl
def register_cam_sources(register):
    register(AmeCam)
