import json

from analysis import zoo


def test_zoo_trains_each_quantizer_and_tabulates(tmp_path, capsys):
    assert (
        zoo.main(["--base", "smoke", "--steps", "4", "--quantizers", "fsq", "identity", "--root", str(tmp_path)]) == 0
    )
    rows = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert [r["quantizer"] for r in rows] == ["fsq", "identity"]
    assert rows[0]["codes"] == 1000 and 0 < rows[0]["val/codebook_usage"] <= 1
    assert rows[1]["codes"] is None and rows[1]["val/l1"] > 0
    printed = capsys.readouterr().out
    assert "| fsq | 1000 |" in printed and "| identity | - |" in printed
