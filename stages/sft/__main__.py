from pipeline.runs import run_main
from stages.sft.sft import main

run_main(main)
