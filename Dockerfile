# wav2mp3: one Python process, no ffmpeg; LAME comes inside the lameenc wheel.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_URL=sqlite:////data/wav2mp3.db \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app
COPY requirements.txt .
# Only the service's packages: the tests' are in requirements-dev.txt.
RUN pip install -r requirements.txt \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent wav2mp3 \
 && mkdir -p /data && chown wav2mp3:wav2mp3 /data
COPY wav2mp3.py schema.sql ./
COPY static/ ./static/

USER wav2mp3
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "wav2mp3.py"]
