from stages.sft.sft import main

main()
