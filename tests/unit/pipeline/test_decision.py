from __future__ import annotations

import numpy as np

from knitwatch.pipeline.decision.regions import Confirmation, find_regions


def test_regions_need_area_and_peak() -> None:
    amap = np.zeros((100, 100), np.float32)
    amap[10:20, 10:20] = 0.6  # big, but its peak is under the image threshold
    amap[50:60, 50:60] = 0.6
    amap[55, 55] = 2.0  # big with a high peak: kept
    amap[80:82, 80:82] = 5.0  # high but tiny: dropped
    d = find_regions(amap, pixel_threshold=0.5, image_threshold=1.0, min_area_px=20)
    assert d.defect
    assert [r.bbox for r in d.regions] == [(50, 50, 60, 60)]
    assert d.regions[0].area == 100 and d.regions[0].peak == 2.0
    assert d.mask is not None and int(d.mask.sum() // 255) == 100
    assert not find_regions(np.zeros((10, 10)), pixel_threshold=0.5, image_threshold=1, min_area_px=1).defect


def test_k_of_n_in_capture_order() -> None:
    c = Confirmation(2, 3)
    assert [c.update(s, d) for s, d in [(0, True), (1, False), (2, False), (3, True)]] == [False, False, False, False]
    assert c.update(4, True)  # frames 2,3,4: two defective
    c2 = Confirmation(2, 3)
    assert not c2.update(10, True)
    assert c2.update(9, True)  # arrived out of order, still inside the window
    assert not Confirmation(2, 3).update(0, True)
    c3 = Confirmation(2, 3)
    c3.update(0, True)
    assert not c3.update(5, True)  # frames 1..4 never arrived: frame 0 left the window
