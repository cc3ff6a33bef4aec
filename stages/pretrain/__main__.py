from pipeline.runs import run_main
from stages.pretrain.pretrain import main

run_main(main)
