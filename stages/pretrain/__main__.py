from stages.pretrain.pretrain import main

main()
