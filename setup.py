"""aha: reinforcement learning from verifiable rewards (R1-Zero / R1 style GRPO) on Ray."""
from setuptools import setup

setup(
    name="aha",
    version="0.1.0",
    description="GRPO with vLLM rollout, CPU verifier and learner actor pools on Ray",
    python_requires=">=3.10",
    packages=["actors", "learner", "learner.megatron", "rollout", "rewards", "cluster", "cluster.stages"],
    package_data={"cluster": ["configs/*.yaml"]},
    # CPU pins live in requirements/cpu-lock.txt (installed by `make install`); these are the
    # direct dependencies for a GPU install, see README.
    install_requires=[
        "torch>=2.11",
        "ray[default]>=2.60",
        "transformers>=5.16",
        "safetensors",
        "pyarrow>=20",
        "pyyaml",
        "math-verify[antlr4_13_2]>=0.9",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "pyseccomp==0.1.2",  # the code sandbox's syscall filter (ctypes over libseccomp.so.2)
    ],
    extras_require={
        "gpu": ["vllm==0.26.0", "megatron-core==0.19.2", "transformer-engine[pytorch]==2.20.2"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["aha = cluster.cli:main"]},
)
