"""The one text a queued lease is shown with, in a cell (the kernel) and on stderr (``run``)."""

from jupyter_elastic_gpu.broker.client import describe_wait


def test_a_quota_wait_names_what_holds_the_quota_and_how_to_stop():
    lease = {
        "fraction": 0.5,
        "reason": "quota",
        "position": 2,
        "blocked_by": [{"session": "0123456789", "fraction": 1.0}, {"notebook": "a.ipynb", "fraction": 0.25}],
    }
    text = describe_wait(lease)
    assert text.startswith("Waiting for a 0.5 GPU slice: your GPU quota is in use by ")
    assert "kernel 01234567 (1 GPU), a.ipynb (0.25 GPU)" in text and "Position 2" in text
    assert text.endswith("interrupt the kernel to stop waiting.")
    assert describe_wait(lease, "press Ctrl-C").endswith("press Ctrl-C to stop waiting.")


def test_a_pool_wait_says_the_pool_is_busy():
    text = describe_wait({"fraction": 2, "reason": "pool", "position": 1})
    assert "Waiting for a 2 GPU slice: all GPU slices of the pool are busy." in text
