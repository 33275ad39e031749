"""The shipped run configs (YAML), installed as package data of modeconn.configs."""
