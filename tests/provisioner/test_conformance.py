"""jupyter_kernel_test's message-spec conformance suite against the GPU kernelspec.

The kernelspec is installed into a temp prefix found through JUPYTER_PATH, so the suite
starts the kernel the way any Jupyter front end would: by name, through the provisioner.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jupyter_kernel_test as jkt

from jupyter_elastic_gpu.provisioner.kernelspecs import ElasticGPUKernelSpecs
from tests.conftest import AgentProcess


class ElasticGPUKernelTests(jkt.KernelTests):
    kernel_name = "python3-gpu-0.5"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        # and on the remote GPU
        {"code": "import torch; torch.ones(3, device='cuda').sum().item()", "result": "3.0"},
        {"code": "torch.cuda.is_available()", "result": "True"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def setUpClass(cls) -> None:
        cls._saved_env = {
            k: os.environ.get(k)
            for k in ("JUPYTER_PATH", "ELASTIC_GPU_AGENT", "ELASTIC_GPU_BROKER_URL")
        }
        cls._prefix = tempfile.mkdtemp(prefix="egpu-kernels-")
        ElasticGPUKernelSpecs().install([0.5], prefix=cls._prefix)
        cls._agent = AgentProcess("--session-grace", "2")
        os.environ["JUPYTER_PATH"] = os.path.join(cls._prefix, "share", "jupyter")
        os.environ["ELASTIC_GPU_AGENT"] = cls._agent.address
        os.environ.pop("ELASTIC_GPU_BROKER_URL", None)
        try:
            super().setUpClass()
        except BaseException:
            cls._restore()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._restore()

    @classmethod
    def _restore(cls):
        cls._agent.stop()
        shutil.rmtree(cls._prefix, ignore_errors=True)
        for k, v in cls._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def test_kernel_info_names_the_gpu_kernel(self):
        self.flush_channels()
        msg_id = self.kc.kernel_info()
        reply = self.kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["implementation"] == "elastic-gpu"
        assert reply["content"]["language_info"]["name"] == "python"
