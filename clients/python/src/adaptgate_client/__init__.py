"""adaptgate-client: the Python client and CLI of the adaptgate gateway.

    from adaptgate_client import Client
    with Client("localhost:50051", token) as client:
        vectors = client.embed(["hello"]).vectors        # [1, dim] float32
        labels = client.classify(["hi"], "spam:prod").results
"""

from adaptgate_client.aio import AsyncClient
from adaptgate_client.client import Client, Stubs
from adaptgate_client.retry import NO_RETRY, RetryPolicy
from adaptgate_client.tls import ClientTls
from adaptgate_client.types import (
    Adapter, AdapterResults, BlockLearningRate, Classification, Classifications, ConfusionMatrix, ConfusionRow, Dataset,
    DeletedAdapters, Embeddings, Encoding, Job, JobDetails, JobEvent, JobMetrics, JobState, LabelCount, LabelScore,
    MethodChoice, Pooling,
)

__version__ = "0.1.0"
__all__ = [
    "Adapter", "AdapterResults", "AsyncClient", "BlockLearningRate", "Classification", "Classifications", "Client",
    "ClientTls", "ConfusionMatrix", "ConfusionRow", "Dataset", "DeletedAdapters", "Embeddings", "Encoding", "Job",
    "JobDetails", "JobEvent", "JobMetrics", "JobState", "LabelCount", "LabelScore", "MethodChoice", "NO_RETRY", "Pooling",
    "RetryPolicy", "Stubs",
]
