from stages.ppo.ppo import main

main()
