"""Build script: pure Python for now; the CUDA extension build lands with the csrc/ backend."""
from setuptools import setup

setup(packages=["fastprompt", "fastprompt.ops", "fastprompt.prompts", "fastprompt.integrations", "fastprompt.kernels"])
