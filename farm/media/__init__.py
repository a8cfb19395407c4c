"""Media the multimodal pipelines make: speech (eSpeak NG) and video (PyAV), plain functions
over bytes that stages call; they import their libraries only when used."""
