"""The agent's metrics: host and overlay figures, pushed over MQTT and served for pull.

Nothing here imports pydantic, FastAPI or httpx: this is the agent's steady-state
import path and it must stay small.
"""
