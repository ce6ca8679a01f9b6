from kvcache.demo import main

main()
