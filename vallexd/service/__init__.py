"""The service core both transports call: request validation, the queue and the model worker."""
