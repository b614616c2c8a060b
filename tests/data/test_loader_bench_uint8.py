"""loader-bench's rows for the uint8 path (augment_on: device) and the JPEG path (image_decode: device) beside
today's, on a few generated files."""

from __future__ import annotations

from omnimae_pl.data.loader_bench import run


def test_the_uint8_rows_and_the_bytes_sent(tmp_path):
    rates, sent = run(tmp_path, seconds=0.01, num_clips=2, num_images=4)
    for name in ("images", "images_uint8", "image_decodes", "images_jpeg", "replicated_samples",
                 "replicated_samples_uint8"):
        assert rates[name]["items"] > 0 and rates[name]["per_s_cpu"] > 0, name
    assert sent["image"]["bytes_per_sample"] > 3.9 * sent["image_uint8"]["bytes_per_sample"]  # masks, labels: fp32/4
    assert sent["video"]["bytes_per_sample"] > 4 * sent["video_uint8"]["bytes_per_sample"]
    assert sent["video"]["samples_per_batch"] == sent["video_uint8"]["samples_per_batch"] == 32  # 8 clips x 4
    assert {name for name, row in sent.items() if "device_op_ms_per_batch" in row} == {
        "image_uint8", "image_jpeg", "video_uint8"}
    # image_decode: device ships the files (about 40 KB at 500 x 375), not the 150 KB crops
    assert 0 < sent["image_jpeg"]["bytes_per_sample"] < sent["image_uint8"]["bytes_per_sample"]
