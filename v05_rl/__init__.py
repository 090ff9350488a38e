"""V0.5 RL: estimators, OSLA allocation, priors, policies, rollouts and trainers."""
