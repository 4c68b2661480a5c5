"""The export report's columns (issue 23 item 7): errors on the same relative scale as the tolerances in its
footnote, and quantised files that are not smaller than fp32 (CONV_3D weights stay float32) marked."""

from export.report import ArtifactResult, OutputError, judge, markdown_report


def _result(component, precision, size, max_abs, scale, backend="tflite"):
    r = ArtifactResult(component=component, group=component, backend=backend, precision=precision, status="ok",
                       size_bytes=size, params=1000)
    return judge(r, {"out": OutputError(max_abs=max_abs, mean_abs=max_abs / 10, scale=scale)},
                 {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}[precision])


def test_error_columns_are_relative_and_unshrunk_files_are_marked():
    # An output of magnitude 100: an absolute error of 1.5 is 1.5e-2 relative, inside fp16's 2e-2.
    results = [
        _result("mmdit_stage0", "fp32", 4_000_000, 1e-6, 1.0),
        _result("mmdit_stage0", "fp16", 2_000_000, 1.5, 100.0),
        _result("mmdit_stage0", "int8", 1_000_000, 2.0, 100.0),
        _result("vae_encoder", "fp32", 4_000_000, 1e-6, 1.0),
        _result("vae_encoder", "fp16", 3_990_000, 0.5, 50.0),
        _result("vae_encoder", "int8", 3_980_000, 1.0, 50.0),
        _result("vae_encoder", "fp32", 4_000_000, 3.0, 100_000.0, backend="onnx"),
    ]
    assert all(r.ok for r in results)
    rows = [{"name": n, "group": n, "params": 1000} for n in ("mmdit_stage0", "vae_encoder")]
    text = markdown_report(results, rows, precisions=("fp32", "fp16", "int8"))
    main_table = text.split("## MMDiT graphs")[0]
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
           for line in main_table.splitlines() if line.startswith("| `")}
    # params, 3 sizes, 3 errors, ONNX error, ...
    assert row["`mmdit_stage0`"][4:7] == ["1.0e-06", "1.5e-02", "2.0e-02"]  # was 1.5e+00 and 2.0e+00: absolute
    assert row["`vae_encoder`"][7] == "3.0e-05"
    assert row["`mmdit_stage0`"][1:4] == ["3906 KB", "1953 KB", "977 KB"]
    assert row["`vae_encoder`"][1:4] == ["3906 KB", "3896 KB †", "3887 KB †"]
    assert "TFLite fp16 rel err" in text and "Errors are relative, as the tolerances" in text
    assert "† Not smaller than the fp32 file (`vae_encoder` fp16, `vae_encoder` int8)" in text
    assert "CONV_3D weights (the VAE encoder's causal 3-D convolutions) stay float32" in text
