from jaxinfer.cli import run

run()
