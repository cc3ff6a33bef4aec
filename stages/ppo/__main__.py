from pipeline.runs import run_main
from stages.ppo.ppo import main

run_main(main)
