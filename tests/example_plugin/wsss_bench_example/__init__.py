"""Example third-party plugins for wsss-bench.

- ``randomcam``: a smooth random activation map per slice, seeded per slice (a baseline
  every CAM method should beat).
- ``dilate``: binarise a CAM (min-max > threshold), then dilate the mask by ``radius`` pixels.
"""
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, Refiner
from wsss_bench.lazy import F, torch
from wsss_bench.maps import minmax


class RandomCam(CamSource):
    name = "randomcam"
    version = "1"
    description = "smooth random map per slice (baseline)"
    params = {"smooth": 2}
    mask_rule = "cam"

    def validate(self):
        if self.p["smooth"] < 0:
            raise self.bad_param("smooth", "must be >= 0")

    def maps(self, batch):
        size = batch.images.shape[-1]
        out = []
        for case, z in zip(batch.case_ids, batch.z):
            gen = self.ctx.generator(f"randomcam/{case}/{z}")
            noise = torch.rand((1, 1, size, size), generator=gen)
            k = 2 * self.p["smooth"] + 1
            out.append(F.avg_pool2d(noise, k, stride=1, padding=self.p["smooth"], count_include_pad=False)[0, 0])
        return minmax(torch.stack(out)).to(batch.images.device)


class Dilate(Refiner):
    name = "dilate"
    version = "1"
    description = "threshold the CAM, then dilate the mask"
    params = {"radius": 1, "threshold": 0.5}
    contract_cam = "randomcam"  # the contract suite feeds this refiner randomcam maps

    def validate(self):
        if self.p["radius"] < 0 or not 0 <= self.p["threshold"] < 1:
            raise self.bad_param("radius/threshold", "needs radius >= 0 and 0 <= threshold < 1")

    def refine(self, batch, maps, sources):
        mask = (minmax(maps[0]) > self.p["threshold"]).float()[:, None]  # the first map source
        r = self.p["radius"]
        if r:
            mask = F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)
        return mask[:, 0] > 0.5


@hookimpl
def register_cam_sources(register):
    register(RandomCam)


@hookimpl
def register_refiners(register):
    register(Dilate)
