"""The `code_interpreter` tool: its spec in every format (`spec`), and adapters that make
kernel-service the code interpreter of an agent framework.

Each adapter imports its framework, installed with the matching extra
(`pip install './client[openai]'`, `[qwen-agent]`, `[lagent]`, `[langchain]`), and talks to
the service through `kernel_service_client.client`. The tool's name, description and
arguments always come from the service (`GET /tools`), so every framework shows the model
the same tool with the service's real limits.
"""
